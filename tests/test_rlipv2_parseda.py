"""RLIPv2-ParSeDA: the reference checkpoint layout converts with zero missing / unexpected keys, and reltag's
module run in float64 equals a float64 re-statement of the reference's forward layer by layer (1e-5 relative)."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from tests.rlipv2_parseda_reference import (
    FULL_A,
    TINY_A,
    reference_forward_parseda_f64,
    reference_key_table_parseda,
    reference_state_dict_parseda,
)
from tests.rlipv2_reference import roberta_pooled_f64
from tests.test_rlipv2_parity import ROBERTA_BASE, assert_close

ENTITIES = ["person", "dog", "bicycle", "tv", "no objects"]
REL_TEXTS = ["riding", "next to", "holding"]
# float64 module vs float64 re-statement: max |diff| <= RTOL * max |reference| per compared tensor. Not 1e-12:
# reltag computes the sine position encoding, the valid ratios and the encoder's reference points in float32
# whatever the model's dtype (models/rlipv2/model.py: bf16 cannot resolve 1/W of a wide level), ~1e-8 of O(1).
RTOL = 1e-5


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> float:
    """Assert max |actual - expected| <= rtol * max |expected|; the message names the worst element. Returns the
    relative error."""
    a, e = actual.detach().to(torch.float64), expected.to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    assert torch.isfinite(a).all(), (
        f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    )
    diff = (a - e).abs()
    scale = float(e.abs().max())
    rel = float(diff.max()) / scale
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert rel <= rtol, (
        f"{what}: max |diff| {float(diff.max()):.3g} = {rel:.3g} x max |reference| {scale:.3g} > {rtol}; worst "
        f"element {idx}: reltag {float(a[idx]):.10g} vs reference {float(e[idx]):.10g}"
    )
    return rel


def reference_args(s=TINY_A, **over) -> argparse.Namespace:
    """The reference's args of scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh at sizes s."""
    a = dict(
        RLIP_ParSeDA_v2=True, hidden_dim=s.d, nheads=s.heads, enc_layers=s.enc_layers, dec_layers=s.dec_layers,
        dim_feedforward=s.ffn, num_queries=2 * s.n_q, num_feature_levels=s.levels, enc_n_points=s.points,
        dec_n_points=s.points, fusion_type="GLIP_attn", fusion_interval=s.fusion_interval, fusion_last_vis=True,
        with_box_refine=True, two_stage=False, use_no_obj_token=True, backbone="resnet50", lang_aux_loss=True,
        subject_class=True, dropout=0.0, gating_mechanism="VXAc", verb_query_tgt_type="vanilla_MBF",
        num_patterns=0, pe_temperatureH=20, pe_temperatureW=20,
    )  # fmt: skip
    a.update(over)
    return argparse.Namespace(**a)


@pytest.fixture(scope="module")
def ref_sd():
    return reference_state_dict_parseda(TINY_A, seed=8)  # a seed whose outputs spread: checked below


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    from transformers import RobertaConfig

    from models.rlipv2.tokenizer import build_word_tokenizer

    d = tmp_path_factory.mktemp("tiny_roberta_a")
    RobertaConfig(**TINY_A.text_config()).save_pretrained(str(d))
    build_word_tokenizer(ENTITIES + REL_TEXTS, d)
    return d


@pytest.fixture(scope="module")
def converted(ref_sd, text_dir):
    from models.rlipv2.convert import convert_reference

    return convert_reference(dict(ref_sd), reference_args(), str(text_dir), ENTITIES[:-1])


def _pixels(seed: int, hw=(96, 128)) -> torch.Tensor:
    return torch.randn(3, *hw, generator=torch.Generator().manual_seed(seed)).to(torch.float32)


_REF: dict = {}


def reference_outputs(ref_sd, text_dir, seed: int) -> dict:
    from transformers import AutoTokenizer

    if seed not in _REF:
        tok = AutoTokenizer.from_pretrained(str(text_dir))
        enc = tok(ENTITIES + REL_TEXTS, padding="longest", return_tensors="pt")
        pooled = roberta_pooled_f64(ref_sd, TINY_A, enc["input_ids"], enc["attention_mask"])
        out = reference_forward_parseda_f64(ref_sd, TINY_A, _pixels(seed), pooled, len(ENTITIES))
        out["pooled"] = pooled
        _REF[seed] = out
    return _REF[seed]


# ------------------------------------------------------------------------------------------- key tables
def test_reference_layout_converts_with_no_key_left_over(ref_sd, converted):
    from models.rlipv2.config import ParSeDAConfig
    from models.rlipv2.parseda import RLIPv2ParSeDA

    table = reference_key_table_parseda(TINY_A)
    assert [e.key for e in table] == list(ref_sd)
    assert isinstance(converted, RLIPv2ParSeDA) and isinstance(converted.cfg, ParSeDAConfig)
    dropped = {e.key for e in table if e.kind in ("alias", "position_ids")}
    own = converted.state_dict()
    missing = sorted(set(ref_sd) - dropped - set(own))
    unexpected = sorted(set(own) - (set(ref_sd) - dropped))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    for k, v in own.items():
        assert torch.equal(v, ref_sd[k]), f"{k}: converted tensor differs from the reference's"
    c = converted.cfg
    assert (c.n_q, c.d_model, c.d_ffn, c.dropout, c.fusion_gating, c.mbf_cardinality) == (
        TINY_A.n_q, TINY_A.d, TINY_A.ffn, 0.0, "VXAc", 16,
    )  # fmt: skip
    assert c.entity_names == ENTITIES[:-1] and not converted.training


@pytest.mark.parametrize(
    "flag, value",
    [
        ("gating_mechanism", "SDFXAc"),
        ("verb_query_tgt_type", "MBF"),
        ("num_patterns", 3),
        ("lang_aux_loss", False),
        ("two_stage", True),
        ("fusion_type", "MDETR_attn"),
    ],
)
def test_converter_refuses_flags_reltag_does_not_implement(ref_sd, text_dir, flag, value):
    from models.rlipv2.convert import convert_reference

    with pytest.raises(ValueError, match=re.escape(f"args.{flag} = {value!r}")):
        convert_reference(dict(ref_sd), reference_args(**{flag: value}), str(text_dir), [])


@pytest.mark.parametrize(
    "change, key",
    [
        ("remove", "transformer.verb_decoder.query_scale.layers.1.bias"),
        ("remove", "transformer.verb_tgt_generator.fc_3.7.weight"),
        ("extra", "transformer.encoder.VLFuse_layers.0.b_attn.gamma_v_down.weight"),
        ("shape", "refpoint_embed.weight"),
        ("alias", "transformer.ho_decoder.sub_bbox_embed.1.layers.2.bias"),
    ],
)
def test_converter_names_the_offending_key(ref_sd, text_dir, change, key):
    from models.rlipv2.convert import convert_reference

    sd = dict(ref_sd)
    if change == "remove":
        del sd[key]
    elif change == "extra":
        sd[key] = torch.zeros(4, 4)
    elif change == "shape":
        sd[key] = torch.zeros(sd[key].shape[0], 2)
    else:
        sd[key] = sd[key] + 1.0
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_reference(sd, reference_args(), str(text_dir), [])


def test_full_size_reference_table_is_reltag_table_plus_aliases_and_position_ids():
    from models.rlipv2.config import ParSeDAConfig
    from models.rlipv2.parseda import RLIPv2ParSeDA

    table = reference_key_table_parseda(FULL_A)
    aliases = [e for e in table if e.kind == "alias"]
    assert len(aliases) == 72  # 2 decoders x (sub, obj) x 3 layers x 3 Linear x (weight, bias)
    by_key = {e.key: e for e in table}
    assert by_key["transformer.ho_decoder.ref_point_head.layers.0.weight"].shape == (256, 512)
    assert by_key["transformer.verb_tgt_generator.fc_1.15.weight"].shape == (16, 256)
    assert by_key["transformer.encoder.layers.5.linear1.weight"].shape == (2048, 256)
    cfg = ParSeDAConfig(text_config=dict(ROBERTA_BASE))
    with torch.device("meta"):
        model = RLIPv2ParSeDA(cfg, tokenizer=None)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {e.key: e.shape for e in table if e.kind not in ("alias", "position_ids")}
    only_ref, only_ours = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not only_ref and not only_ours, (
        f"only in the reference {only_ref[:10]}, only in reltag {only_ours[:10]}"
    )
    wrong = [(k, theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]]
    assert not wrong, f"shapes differ (key, reference, reltag): {wrong[:10]}"
    assert len(ours) == len(table) - len(aliases) - 1


def test_reference_outputs_are_not_degenerate(ref_sd, text_dir):
    out = reference_outputs(ref_sd, text_dir, 0)
    p = torch.sigmoid(out["rel_logits"][-1])
    assert p.std() > 0.05 and p.min() < 0.2 and p.max() > 0.5, (
        f"p_relation does not spread: {p.flatten()[:8]}"
    )
    for what in ("sub_boxes", "obj_boxes"):
        b = out[what][-1]
        assert b.std(0).min() > 0.02 and ((b > 0.01) & (b < 0.99)).float().mean() > 0.9, f"{what} collapse"
    for k, t in enumerate(out["text_resized"]):
        assert t.std(0).mean() > 0.2 * t.std(), f"fusion round {k} collapses the phrases"
    ps = out["sub_logits"][-1].softmax(-1).amax(-1)
    assert (ps < 0.995).all() and ps.std() > 1e-3, f"p_subject is saturated or constant: {ps}"
    # the relation decoder's box refinement moves its later anchors: its layers differ from the entity decoder's
    assert (out["h_rel"][1] - out["h_rel"][0]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------- parity
def _run_f64(model, seeds):
    """reltag in float64: a batch of the seeds' images (same size, no padding), every decoder layer, and the
    fused text after each round's RoBERTa layer."""
    fused = []
    handles = [
        m.register_forward_hook(
            lambda _m, _i, o: fused.append((o[0] if isinstance(o, tuple) else o).detach())
        )
        for m in model.transformer.encoder.roberta_layers
    ]
    try:
        px = torch.stack([_pixels(s) for s in seeds]).to(torch.float64)
        mask = torch.zeros(len(seeds), px.shape[2], px.shape[3], dtype=torch.bool)
        with torch.no_grad():
            pooled = model.phrase_features(ENTITIES + REL_TEXTS, use_cache=False)
            state = model.encode(
                px, mask, [ENTITIES] * len(seeds), [REL_TEXTS] * len(seeds), use_phrase_cache=False
            )
            out = model.decode(state, torch.arange(len(seeds)), all_layers=True)
    finally:
        for h in handles:
            h.remove()
    layers = out.aux + [
        dict(sub_boxes=out.sub_boxes, obj_boxes=out.obj_boxes, sub_logits=out.sub_logits, obj_logits=out.obj_logits,
             rel_logits=out.rel_logits)
    ]  # fmt: skip
    return pooled, state, torch.stack(fused), layers


@pytest.mark.parametrize("seeds", [(0,), (1, 0)], ids=["one_image", "batch_of_two"])
def test_float64_module_matches_reference_layer_by_layer(ref_sd, text_dir, converted, seeds):
    import copy

    model = copy.deepcopy(converted).double()
    pooled, state, fused, layers = _run_f64(model, seeds)
    for b, seed in enumerate(seeds):
        ref = reference_outputs(ref_sd, text_dir, seed)
        assert_rel(pooled, ref["pooled"], "pooled RoBERTa phrase features")
        assert [tuple(s) for s in state.spatial_shapes.tolist()] == ref["shapes"]
        for k in range(TINY_A.n_fusion):
            assert_rel(fused[k, b], ref["text_fused"][k], f"image {b}: fused text, round {k}")
            assert_rel(state.text[k, b], ref["text_resized"][k], f"image {b}: resized text, round {k}")
        assert_rel(state.memory[b], ref["memory"], f"image {b}: encoder memory")
        for lv in range(TINY_A.dec_layers):
            for what in ("sub_boxes", "obj_boxes", "sub_logits", "obj_logits", "rel_logits"):
                assert_rel(layers[lv][what][b], ref[what][lv], f"image {b}: decoder layer {lv} {what}")


def test_float32_module_is_close_to_the_reference(ref_sd, text_dir, converted):
    """The float32 module as trained: within float32's error of the float64 reference on the last layer."""
    px = _pixels(0)[None]
    with torch.no_grad():
        state = converted.encode(px, torch.zeros(1, 96, 128, dtype=torch.bool), [ENTITIES], [REL_TEXTS])
        out = converted.decode(state, torch.arange(1))
    ref = reference_outputs(ref_sd, text_dir, 0)
    assert_close(out.sub_boxes[0], ref["sub_boxes"][-1], 1e-4, "float32 last-layer sub_boxes")
    assert_close(out.rel_logits[0], ref["rel_logits"][-1], 1e-3, "float32 last-layer rel_logits", rtol=1e-4)


# ------------------------------------------------------------------------------------ checkpoints and refusals
def test_checkpoint_round_trip_says_which_model(converted, tmp_path):
    import json

    from models.rlipv2.checkpoint import CONFIG_NAME, checkpoint_model, load_checkpoint, save_checkpoint
    from models.rlipv2.config import RLIPv2Config
    from models.rlipv2.parseda import RLIPv2ParSeDA

    save_checkpoint(converted, tmp_path / "a")
    assert checkpoint_model(tmp_path / "a") == "parseda"
    loaded = load_checkpoint(tmp_path / "a")
    assert isinstance(loaded, RLIPv2ParSeDA) and loaded.cfg == converted.cfg
    own = converted.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    stored = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match="unknown keys"):  # a ParSeD-only reader refuses it
        RLIPv2Config.from_dict(stored)
    # the tagger and the tag stage refuse it by name, before loading anything
    from models.rlipv2.tagger import load_tagger
    from tasks.config import TagConfig
    from tasks.stages.tag.rtagger import RTaggerRunner

    with pytest.raises(
        ValueError, match="holds an RLIPv2-ParSeDA model .* needs an RLIPv2-ParSeD checkpoint"
    ):
        load_tagger(tmp_path / "a")
    with pytest.raises(ValueError, match="holds an RLIPv2-ParSeDA model"):
        RTaggerRunner.from_config(TagConfig(tagger="rtagger", checkpoint=str(tmp_path / "a")))
    stored["model"] = "parsed"  # a config file that contradicts the weights' stamp
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="written by 'parseda'"):
        load_checkpoint(tmp_path / "a")


def test_decode_refuses_tagger_queries(converted):
    state = converted.encode(
        _pixels(0)[None], torch.zeros(1, 96, 128, dtype=torch.bool), [ENTITIES], [REL_TEXTS]
    )
    with pytest.raises(ValueError, match="learned queries only"):
        converted.decode(state, torch.arange(1), torch.full((1, 2, 4), 0.5))
    with pytest.raises(ValueError, match="pair_valid"):
        converted.decode(state, torch.arange(1), pair_valid=torch.ones(1, 2, dtype=torch.bool))


def test_config_refuses_what_the_reference_cannot_run():
    from models.rlipv2.config import ParSeDAConfig

    with pytest.raises(ValueError, match="fusion_gating 'SXAc'"):
        ParSeDAConfig(fusion_gating="SXAc")
    with pytest.raises(ValueError, match="3 fusion rounds but 2 decoder layers"):
        ParSeDAConfig(dec_layers=2)


def test_converter_refuses_a_parsed_checkpoint_with_another_fusion_gate(tmp_path):
    """The reference's ParSeD pre-training passes --gating_mechanism VXAc: no extra tensors, so without this
    check such a checkpoint would load into reltag's ParSeD (the R-Tagger's per-channel gate) and compute
    something else."""
    from transformers import RobertaConfig

    from models.rlipv2.convert import convert_reference
    from models.rlipv2.tokenizer import build_word_tokenizer
    from tests.rlipv2_reference import TINY, reference_state_dict
    from tests.test_rlipv2_parity import reference_args as parsed_args

    RobertaConfig(**TINY.text_config()).save_pretrained(str(tmp_path))
    build_word_tokenizer(ENTITIES, tmp_path)
    sd = reference_state_dict(TINY, seed=1)
    args = parsed_args()
    args.gating_mechanism = "VXAc"
    with pytest.raises(ValueError, match="args.gating_mechanism = 'VXAc'"):
        convert_reference(dict(sd), args, str(tmp_path), [])
    args.gating_mechanism = "GLIP"  # main.py's default, the released tagger's
    assert type(convert_reference(dict(sd), args, str(tmp_path), [])).__name__ == "RLIPv2ParSeD"
