"""Convert a reference checkpoint (JacobYuan7/RLIPv2, `{'model': state_dict, 'epoch', 'args'}`) into a reltag
checkpoint directory (safetensors weights, rlipv2_config.json, tokenizer/): the R-Tagger and the other
RLIPv2-ParSeD checkpoints (`--RLIP_ParSeD_v2`), or RLIPv2-ParSeDA (`--RLIP_ParSeDA_v2`: the paper's main model;
recognised by args.RLIP_ParSeDA_v2 or by its `refpoint_embed`).

    python -m models.rlipv2.convert --reference checkpoint.pth --text-model roberta-base|DIR --out DIR \\
        [--vocabulary coco|o365|none]

The .pth is read with `torch.load(weights_only=True)`; the only class allowed beyond tensors and containers is
`argparse.Namespace` (the reference pickles its args): anything else is refused, never unpickled. reltag's
module tree carries the reference's names, so the keys map one to one, except:
- `transformer.ho_decoder.{sub,obj}_bbox_embed.{i}.*` and `transformer.verb_decoder.{sub,obj}_bbox_embed.{i}.*`:
  the reference registers its box MLPs twice (the decoders hold slices of the top-level lists); they must
  equal `{sub,obj}_bbox_embed.{i}` / `.{L + i}` and are dropped;
- `transformer.text_encoder.embeddings.position_ids` (and `token_type_ids`): buffers older transformers saved;
  the position ids must be 0..N-1 and are dropped (transformers 5 rebuilds them).
Anything else missing or unexpected, or any shape that does not fit, is an error listing the keys.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from models.rlipv2.config import FUSION_GATINGS, ParSeDAConfig, RLIPv2Config
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.parseda import RLIPv2ParSeDA

_ALIAS = re.compile(r"^transformer\.(ho_decoder|verb_decoder)\.(sub|obj)_bbox_embed\.(\d+)\.(.+)$")
_DROPPED_BUFFERS = (
    "transformer.text_encoder.embeddings.position_ids",
    "transformer.text_encoder.embeddings.token_type_ids",
)
FUSION_HEADS = 8  # RLIPv2_VLFuse builds its bi-attention with 8 heads whatever the flags


def load_reference_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """Read a reference .pth safely: tensors, containers and argparse.Namespace only.

    Returns (state_dict, args). Accepts {'model': sd, ...}, or a bare state dict; strips a DDP 'module.' prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses any other global; say which and why
        raise ValueError(
            f"reference checkpoint {str(path)!r} cannot be loaded with weights_only=True and the allow-list "
            f"[argparse.Namespace]: {e}".split("\n")[0]
        ) from None
    args = None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd, args = obj["model"], obj.get("args")
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"reference checkpoint {str(path)!r} holds no 'model' state dict (found {keys})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if args is not None and not isinstance(args, argparse.Namespace):
        raise ValueError(
            f"reference checkpoint {str(path)!r}: 'args' is a {type(args).__name__}, not a Namespace"
        )
    return dict(sd), args


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _need(sd: dict, key: str, what: str = "an RLIP_ParSeD_v2") -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"reference state dict has no {key!r}: not {what} checkpoint")
    return sd[key]


def reference_model(sd: dict, args: argparse.Namespace | None) -> str:
    """'parseda' for an RLIP_ParSeDA_v2 checkpoint (args flag, or DAB's anchor embedding in the weights), else
    'parsed'."""
    a = vars(args) if args is not None else {}
    if a.get("RLIP_ParSeDA_v2") or "refpoint_embed.weight" in sd:
        return "parseda"
    return "parsed"


# flags of the reference's ParSeDA that change the network; the value reltag implements, and why
_PARSEDA_REFUSALS = {
    "use_dab": (True, "ParSeDA's decoders are DAB decoders"),
    "num_patterns": (
        0,
        "pattern embeddings (num_patterns > 0) are not implemented (the reference asserts 0)",
    ),
    "verb_query_tgt_type": (
        "vanilla_MBF",
        "only the released relation query content (vanilla_MBF) is implemented",
    ),
    "lang_aux_loss": (
        True,
        "decoder layer l is scored against fusion round l (lang_aux_loss) in the released model",
    ),
    "high_dim_query_update": (False, "high_dim_query_update is not implemented"),
    "no_sine_embed": (False, "the box sine embedding is the one implemented"),
}


def config_from_reference(
    sd: dict[str, torch.Tensor], args: argparse.Namespace | None, text_config: dict, class_keys: list[str]
) -> RLIPv2Config:
    """Architecture sizes from the tensor shapes; head and point counts from args (not visible in shapes).
    A ParSeDA checkpoint gives a ParSeDAConfig."""
    a = vars(args) if args is not None else {}
    model = reference_model(sd, args)
    what = "an RLIP_ParSeDA_v2" if model == "parseda" else "an RLIP_ParSeD_v2"
    enc = "transformer.encoder" if model == "parseda" else "transformer.ho_encoder"
    refusals = {
        "fusion_type": ("GLIP_attn", "only the GLIP_attn fusion of the released tagger is implemented"),
        "with_box_refine": (True, "the tagger was trained with box refinement"),
        "two_stage": (False, "two-stage Deformable DETR is not implemented"),
        "fusion_last_vis": (True, "the released tagger fuses only the last visual level"),
        "separate_bidirectional": (False, "separate bidirectional fusion is not implemented"),
        "stable_softmax_2d": (False, "stable_softmax_2d changes the fusion scores and is not implemented"),
        "clamp_min_for_underflow": (False, "fusion score clamping is not implemented"),
        "clamp_max_for_overflow": (False, "fusion score clamping is not implemented"),
    }
    gating = a.get("gating_mechanism", "GLIP")  # main.py's default
    if model == "parsed" and gating != "GLIP":
        # the reference's ParSeD pre-training passes --gating_mechanism VXAc; reltag's ParSeD is the R-Tagger's
        raise ValueError(
            f"reference args.gating_mechanism = {gating!r}, reltag's RLIPv2-ParSeD has the R-Tagger's 'GLIP' gate "
            f"(per-channel gammas); another gate would load without error and compute something else"
        )
    if model == "parseda":
        refusals.update(_PARSEDA_REFUSALS)
        if gating not in FUSION_GATINGS:
            raise ValueError(
                f"reference args.gating_mechanism = {gating!r}, reltag implements {list(FUSION_GATINGS)}: the "
                f"other gates add parameters and arithmetic the released ParSeDA does not use"
            )
    for name, (want, why) in refusals.items():
        if name in a and a[name] != want:
            raise ValueError(f"reference args.{name} = {a[name]!r}, reltag needs {want!r}: {why}")
    if "backbone" in a and a["backbone"] != "resnet50":
        raise ValueError(f"reference args.backbone = {a['backbone']!r}; only resnet50 is implemented")
    level_embed = _need(sd, "transformer.level_embed", what)
    n_levels, d = level_embed.shape
    depths = tuple(_count(sd, rf"^backbone\.0\.body\.layer{i}\.(\d+)\.conv1\.weight$") for i in range(1, 5))
    widths = tuple(int(_need(sd, f"backbone.0.body.layer{i}.0.conv1.weight").shape[0]) for i in range(1, 5))
    stem = int(_need(sd, "backbone.0.body.conv1.weight").shape[0])
    enc_rx = re.escape(enc)
    enc_layers = _count(sd, rf"^{enc_rx}\.layers\.(\d+)\.")
    n_fusion = _count(sd, rf"^{enc_rx}\.VLFuse_layers\.(\d+)\.")
    dec_layers = _count(sd, r"^transformer\.ho_decoder\.layers\.(\d+)\.")
    if n_fusion == 0 or enc_layers % n_fusion:
        raise ValueError(f"reference state dict has {enc_layers} encoder layers and {n_fusion} fusion blocks")
    d_ffn = int(_need(sd, f"{enc}.layers.0.linear1.weight", what).shape[0])
    fusion_dim = int(_need(sd, f"{enc}.VLFuse_layers.0.b_attn.attn.v_proj.weight", what).shape[0])
    queries_key = "tgt_embed.weight" if model == "parseda" else "transformer.verb_tgt.weight"
    n_queries = int(_need(sd, queries_key, what).shape[0])
    n_heads = int(a.get("nheads", 8))
    n_points = int(a.get("enc_n_points", 4))
    if int(a.get("dec_n_points", n_points)) != n_points:
        raise ValueError(
            f"reference enc_n_points {n_points} != dec_n_points {a['dec_n_points']}; reltag uses one"
        )
    offsets = int(_need(sd, f"{enc}.layers.0.self_attn.sampling_offsets.weight", what).shape[0])
    if offsets != n_heads * n_levels * n_points * 2:
        raise ValueError(
            f"sampling_offsets has {offsets} outputs, but nheads {n_heads} x levels {n_levels} x points "
            f"{n_points} x 2 = {n_heads * n_levels * n_points * 2}: pass the args the checkpoint was trained with"
        )
    for name, val in (("hidden_dim", d), ("dim_feedforward", d_ffn), ("enc_layers", enc_layers),
                      ("dec_layers", dec_layers), ("num_queries", n_queries), ("num_feature_levels", n_levels)):  # fmt: skip
        if name in a and int(a[name]) != val:
            raise ValueError(f"reference args.{name} = {a[name]} but the weights have {val}")
    extra = {}
    if model == "parseda":
        extra = dict(
            fusion_gating=a.get("gating_mechanism", "GLIP"),
            mbf_cardinality=_count(sd, r"^transformer\.verb_tgt_generator\.fc_1\.(\d+)\.weight$"),
        )
    cls = ParSeDAConfig if model == "parseda" else RLIPv2Config
    return cls(
        **extra,
        backbone_depths=depths,
        backbone_widths=widths,
        backbone_stem=stem,
        text_config=text_config,
        # no truncation in the reference: the whole phrase, up to RoBERTa's positions (514 - 2 for roberta-base)
        max_text_tokens=int(text_config["max_position_embeddings"]) - 2,
        d_model=int(d),
        n_heads=n_heads,
        n_points=n_points,
        d_ffn=d_ffn,
        n_levels=int(n_levels),
        enc_layers=enc_layers,
        fusion_interval=enc_layers // n_fusion,
        fusion_dim=fusion_dim,
        fusion_heads=int(a.get("fusion_heads", FUSION_HEADS)),
        dec_layers=dec_layers,
        n_q=n_queries // 2,
        dropout=float(a.get("dropout", 0.0 if model == "parseda" else 0.1)),
        entity_names=list(class_keys),
    )


def map_reference_keys(sd: dict[str, torch.Tensor], dec_layers: int) -> dict[str, torch.Tensor]:
    """Reference key names -> reltag's: drop the aliased box MLPs (after checking them) and the stale buffers."""
    out = {}
    for k, v in sd.items():
        m = _ALIAS.match(k)
        if m:
            dec, which, i, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            top = f"{which}_bbox_embed.{i if dec == 'ho_decoder' else dec_layers + i}.{rest}"
            if top not in sd:
                raise ValueError(f"reference key {k!r} aliases {top!r}, which the state dict does not have")
            if sd[top].shape != v.shape or not torch.equal(sd[top], v):
                raise ValueError(f"reference key {k!r} should be the same tensor as {top!r} but differs")
            continue
        if k in _DROPPED_BUFFERS:
            if k.endswith("position_ids") and not torch.equal(
                v.reshape(-1), torch.arange(v.numel(), dtype=v.dtype)
            ):
                raise ValueError(f"reference buffer {k!r} is not 0..{v.numel() - 1}; refusing to drop it")
            continue
        out[k] = v
    return out


def convert_reference(
    state_dict: dict[str, torch.Tensor],
    args: argparse.Namespace | None,
    text_model: str,
    class_keys: list[str],
) -> RLIPv2ParSeD | RLIPv2ParSeDA:
    """Build reltag's model (ParSeD or ParSeDA, as the checkpoint is) from a reference state dict; every tensor
    is placed, none is left over."""
    from transformers import AutoConfig

    from models.rlipv2.text import ROBERTA_KEYS
    from models.rlipv2.tokenizer import load_tokenizer

    try:
        tconf = AutoConfig.from_pretrained(text_model)
        tokenizer = load_tokenizer(text_model)
    except OSError as e:
        raise ValueError(
            f"--text-model {text_model!r}: no RoBERTa config/tokenizer found (a hub id in the local cache or a "
            f"directory with config.json and tokenizer files): {e}".split("\n")[0]
        ) from None
    text_config = {k: getattr(tconf, k) for k in ROBERTA_KEYS}
    cfg = config_from_reference(state_dict, args, text_config, class_keys)
    mapped = map_reference_keys(state_dict, cfg.dec_layers)
    cls = RLIPv2ParSeDA if isinstance(cfg, ParSeDAConfig) else RLIPv2ParSeD
    model = cls(cfg, tokenizer, pretrained=False)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    if missing or unexpected or wrong:
        shapes = [
            f"{k}: reference {tuple(mapped[k].shape)} vs reltag {tuple(own[k].shape)}" for k in wrong[:10]
        ]
        raise ValueError(
            f"reference state dict does not fit {type(model).__name__}: {len(missing)} missing {missing[:10]}, "
            f"{len(unexpected)} unexpected {unexpected[:10]}, {len(wrong)} with other shapes {shapes}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    from models.rlipv2.checkpoint import save_checkpoint
    from models.rlipv2.vocab import class_keys

    p = argparse.ArgumentParser(prog="python -m models.rlipv2.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="the reference's checkpoint .pth")
    p.add_argument(
        "--text-model", default="roberta-base", help="RoBERTa config + tokenizer: hub id or directory"
    )
    p.add_argument("--out", required=True, help="reltag checkpoint directory to write")
    p.add_argument(
        "--vocabulary", choices=["o365", "coco", "none"], default="o365",
        help="class keys the subject/object heads score (the reference's 365 Objects365 or 80 COCO keys)",
    )  # fmt: skip
    a = p.parse_args(argv)
    try:
        sd, args = load_reference_checkpoint(a.reference)
        keys = [] if a.vocabulary == "none" else class_keys(a.vocabulary)
        model = convert_reference(sd, args, a.text_model, keys)
    except ValueError as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    revision = save_checkpoint(model, a.out)
    n = len(model.state_dict())
    print(f"convert: {len(sd)} reference tensors -> {n} reltag tensors in {a.out} (revision {revision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
