"""RLIPv2-ParSeD / R-Tagger configuration: every constant with its source, a stable hash for run keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields


@dataclass(slots=True)
class RLIPv2Config:
    """Architecture, denoising and loss settings.

    Defaults are the paper's (RLIPv2, ICCV 2023): hidden 256, 8 heads, 4 sampling points, FFN 1024
    (Sec. 4 implementation details, inherited from Deformable DETR); 4 feature levels; 6 encoder layers with
    ALIF every N_v = 2 layers (N_ALIF = 3, Sec. 3.1 / Table 2); 3 decoder layers for Parallel Entity Detection
    and 3 for Sequential Relation Inference (Sec. 3.1); N_Q = 100 query pairs (Sec. 4.2.2); denoising box
    noise 0.4 and label flip 0.2 (Appendix E, Table 4); loss weights 2.5 / 1 / 1 / 1 (Eq. 6).
    """

    # backbone: a transformers hub id / local dir, or an inline ResNetConfig dict (tiny models in tests)
    backbone: str = "microsoft/resnet-50"
    backbone_config: dict | None = None
    # text encoder: RoBERTa-base (Sec. 3.1); phrase feature = RoBERTa's pooler output on <s>
    text_model: str = "roberta-base"
    text_config: dict | None = None
    max_text_tokens: int = 16  # tokens per phrase; class names and relation spans are short
    d_model: int = 256
    n_heads: int = 8
    n_points: int = 4
    d_ffn: int = 1024
    n_levels: int = 4
    enc_layers: int = 6
    alif_every: int = 2  # N_v: one ALIF after every 2 encoder layers -> N_ALIF = 3
    alif_gate_init: float = (
        0.0  # learnable scalar gate alpha (Table 2), starts closed like Flamingo's tanh gates
    )
    dec_layers: int = 3  # Parallel Entity Detection
    rel_dec_layers: int = 3  # Sequential Relation Inference
    n_q: int = 100
    dropout: float = 0.0  # 0.0 at our scale; Deformable DETR uses 0.1 while training at full size
    # images: DETR / Deformable DETR resize (shorter side 800, longer at most 1333), ImageNet statistics
    min_size: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # entity vocabulary always scored by the subject/object heads (e.g. the 365 Objects365 names);
    # the labels of an image's boxes are added per image, and the "no objects" phrase is always last.
    entity_names: list[str] = field(default_factory=list)
    no_object_text: str = "no objects"
    # denoising (Appendix E, Table 4)
    dn_box_noise: float = 0.4
    dn_label_flip: float = 0.2
    dn_groups: int = 1  # noised copies per annotated pair while training (reltag default, not from the paper)
    # loss weights (Eq. 6) and focal loss constants (Lin et al. 2017 defaults, used by RLIP/RLIPv2)
    w_l1: float = 2.5
    w_giou: float = 1.0
    w_cls: float = 1.0
    w_rel: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    no_object_weight: float = 0.1  # DETR's eos_coef for the "no objects" class

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"RLIPv2Config: d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.enc_layers % self.alif_every:
            raise ValueError(
                f"RLIPv2Config: enc_layers {self.enc_layers} is not a multiple of alif_every {self.alif_every}"
            )
        if not 0.0 <= self.dn_label_flip <= 1.0 or self.dn_box_noise < 0:
            raise ValueError(
                f"RLIPv2Config: dn_label_flip {self.dn_label_flip} must be in [0, 1] and dn_box_noise "
                f"{self.dn_box_noise} >= 0"
            )
        self.pixel_mean = tuple(self.pixel_mean)
        self.pixel_std = tuple(self.pixel_std)

    @property
    def n_alif(self) -> int:
        return self.enc_layers // self.alif_every

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RLIPv2Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RLIPv2Config: unknown keys {unknown} in the stored config")
        return cls(**d)

    def hash(self, n: int = 16) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:n]
