"""Pre-training settings: the reference's RLIPv2-ParSeD pre-training run, and what a resume may change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training settings. Defaults: the reference's RLIPv2-ParSeD R50 pre-training on VG + COCO + O365.

    From scripts/RLIP_ParSeD/train_RLIP_ParSeD_v2_mixed_vgcocoo365_resnet.sh: `--lr 1.41e-4 --lr_backbone
    1.41e-5 --text_encoder_lr 1.41e-5 --epochs 20 --lr_drop 15 --schedule step --batch_size 8` on
    `--nproc_per_node=8` (8 images per GPU, 64 per step), `--num_queries 200` (100 pairs),
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
    batch_size: int = 8  # images per process and step
    clip_max_norm: float = 0.1
    num_queries: int = 200  # subject + object queries: 100 pair slots
    seed: int = 42
    # data (passed to the dataset factory): the reference's MixedRelDetection settings
    eta: float = 0.2
    rule: str = "relation_only"
    overlap_filter: bool = False
    max_relations: int = 100
    # model: tiny = the test architecture with a word tokenizer built over the data (offline runs)
    tiny: bool = False
    dropout: float | None = None  # None: the architecture's (0.1 full, 0.0 tiny)
    init_checkpoint: str | None = None  # start from these weights (a save_checkpoint dir) instead of ImageNet
    # not part of the run's identity (a resume may change them)
    max_steps: int | None = None  # stop after this many steps in total (None: all epochs)
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    device: str = "cpu"
    num_workers: int = 0  # DataLoader workers (the reference used 8)
    deterministic: bool = False  # torch.use_deterministic_algorithms

    def __post_init__(self) -> None:
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
