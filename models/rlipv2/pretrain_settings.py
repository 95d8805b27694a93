"""Pre-training settings: the reference's RLIPv2-ParSeDA / ParSeD pre-training runs, and what a resume may change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from models.rlipv2.criterion import LossSettings

#: the models pre-training can build: RLIPv2-ParSeDA (the paper's main model: "Except where stated,
#: RLIPv2-ParSeDA architecture is adopted") and RLIPv2-ParSeD (the R-Tagger's architecture)
MODELS = ("parseda", "parsed")
#: images per GPU and step in the reference's R50 pre-training script of each model (8 GPUs)
REFERENCE_BATCH_SIZE = {"parseda": 4, "parsed": 8}


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training settings. Defaults: the reference's RLIPv2-ParSeDA R50 pre-training on VG + COCO + O365.

    From scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh (and its ParSeD twin
    scripts/RLIP_ParSeD/train_RLIP_ParSeD_v2_mixed_vgcocoo365_resnet.sh, which differs only in the model and
    `--batch_size 8`): `--lr 1.41e-4 --lr_backbone 1.41e-5 --text_encoder_lr 1.41e-5 --epochs 20 --lr_drop 15
    --schedule step --batch_size 4` on `--nproc_per_node=8` (4 images per GPU, 32 per step), `--num_queries 200`
    (100 pairs),
    `--relation_threshold 0.20`; from main.py's defaults (flags the script does not pass): `--weight_decay 1e-4`,
    `--clip_max_norm 0.1`, `--seed 42` (+ rank). Schedule "step" (util/optim.py adjust_learning_rate): every
    learning rate times 0.1 ** (epoch // lr_drop). Optimizer AdamW with three groups: backbone, text encoder,
    the rest. The loader drops the last incomplete batch (BatchSampler drop_last=True), as the reference's.
    """

    lr: float = 1.41e-4
    lr_backbone: float = 1.41e-5
    lr_text_encoder: float = 1.41e-5
    weight_decay: float = 1e-4
    epochs: int = 20
    lr_drop: int = 15  # epochs
    model: str = "parseda"  # "parseda" or "parsed" (MODELS)
    # images per process and step; None: the model's script (REFERENCE_BATCH_SIZE), resolved on construction
    # (dataclasses.replace(s, model=...) keeps the resolved number)
    batch_size: int | None = None
    clip_max_norm: float = 0.1
    num_queries: int = 200  # subject + object queries: 100 pair slots
    seed: int = 42
    # the pre-training objective (models/rlipv2/criterion.py): both scripts pass the same loss flags
    loss: LossSettings = field(default_factory=LossSettings)
    # data (passed to the dataset factory): the reference's MixedRelDetection settings
    eta: float = 0.2
    rule: str = "relation_only"
    overlap_filter: bool = False
    max_relations: int = 100
    # model: tiny = the test architecture with a word tokenizer built over the data (offline runs)
    tiny: bool = False
    dropout: float | None = None  # None: the architecture's (ParSeDA 0.0, ParSeD 0.1; tiny 0.0)
    init_checkpoint: str | None = None  # start from these weights (a save_checkpoint dir) instead of ImageNet
    # not part of the run's identity (a resume may change them)
    max_steps: int | None = None  # stop after this many steps in total (None: all epochs)
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    device: str = "cpu"
    num_workers: int = 0  # DataLoader workers (the reference used 8)
    deterministic: bool = False  # torch.use_deterministic_algorithms

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):  # from a config file's nested mapping
            object.__setattr__(self, "loss", _loss_from_dict(self.loss))
        if not isinstance(self.loss, LossSettings):
            raise ValueError(
                f"PretrainSettings: loss must be a LossSettings or a mapping, got {type(self.loss).__name__}"
            )
        if self.model not in MODELS:
            raise ValueError(f"PretrainSettings: model {self.model!r} is not one of {list(MODELS)}")
        if self.batch_size is None:  # frozen: resolved once, so the identity holds the number used
            object.__setattr__(self, "batch_size", REFERENCE_BATCH_SIZE[self.model])
        for name in (
            "epochs",
            "lr_drop",
            "batch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "num_queries",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSettings: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_queries % 2:
            raise ValueError(
                f"PretrainSettings: num_queries {self.num_queries} must be even (subject + object)"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"PretrainSettings: max_steps must be >= 0, got {self.max_steps}")

    #: fields that do not change what is computed step by step, so a resume may change them
    RUNTIME = ("max_steps", "checkpoint_every", "keep_checkpoints", "device", "num_workers", "deterministic")

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}


def _loss_from_dict(d: dict) -> LossSettings:
    known = {f.name for f in dataclasses.fields(LossSettings)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"PretrainSettings: unknown loss fields {unknown}; known: {sorted(known)}")
    return LossSettings(**d)


# ------------------------------------------------------------------------------ command-line flags
# Top-level fields are `--name-with-dashes VALUE` (booleans: a bare flag); the loss fields are
# `--loss-name-with-dashes VALUE` (booleans as true / false, since several default to on).


def _kind(f: dataclasses.Field) -> str:
    return str(f.type).split(" |")[0].strip()


def _parse_bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def add_settings_flags(ap) -> None:
    """Add a flag for every PretrainSettings field (and every LossSettings field, as --loss-*) to an
    argparse parser; from_flags reads them back."""
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(PretrainSettings):
        if f.name == "loss":
            continue
        flag = "--" + f.name.replace("_", "-")
        if _kind(f) == "bool":
            ap.add_argument(flag, action="store_true", default=None)
        else:
            ap.add_argument(flag, type=types.get(_kind(f), str), default=None)
    for f in dataclasses.fields(LossSettings):
        flag = "--loss-" + f.name.replace("_", "-")
        kind = _parse_bool if _kind(f) == "bool" else types.get(_kind(f), str)
        ap.add_argument(flag, type=kind, default=None, dest="loss__" + f.name)


def from_flags(a) -> PretrainSettings:
    """PretrainSettings from the parsed flags of add_settings_flags (unset flags keep the defaults)."""
    top = {
        f.name: getattr(a, f.name)
        for f in dataclasses.fields(PretrainSettings)
        if f.name != "loss" and getattr(a, f.name) is not None
    }
    loss = {
        f.name: getattr(a, "loss__" + f.name)
        for f in dataclasses.fields(LossSettings)
        if getattr(a, "loss__" + f.name) is not None
    }
    return PretrainSettings(**top, loss=LossSettings(**loss))


def to_flags(s: PretrainSettings) -> list[str]:
    """The flags that rebuild `s` through add_settings_flags / from_flags (None and False fields omitted)."""
    out: list[str] = []
    for f in dataclasses.fields(PretrainSettings):
        v = getattr(s, f.name)
        if f.name == "loss" or v is None or v is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        out += [flag] if v is True else [flag, repr(v) if isinstance(v, float) else str(v)]
    for f in dataclasses.fields(LossSettings):
        v = getattr(s.loss, f.name)
        out += [
            "--loss-" + f.name.replace("_", "-"),
            repr(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v),
        ]
    return out
