"""RLIPv2-ParSeD / R-Tagger configuration: every constant with its source, a stable hash for run keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields


@dataclass(slots=True)
class RLIPv2Config:
    """Architecture, denoising and loss settings of RLIPv2-ParSeD as the released R-Tagger was trained.

    The defaults are the flags of the reference's tagger scripts (JacobYuan7/RLIPv2,
    scripts/verb_tagger/train_vg_RLIP_ParSeD_v2_tagger_resnet.sh and test_Tagger_resnet.sh): ResNet-50,
    4 feature levels, hidden 256, 8 heads, 4 sampling points, FFN 1024, 6 deformable encoder layers with a
    GLIP-style bi-attention fusion before layers 0, 2, 4 (`--fusion_type GLIP_attn --fusion_interval 2`) on the
    coarsest level only (`--fusion_last_vis`), per-channel fusion gammas starting at 1/num_feature_levels = 0.25,
    a RoBERTa layer on the text side after each fusion, 3 entity and 3 relation decoder layers with box
    refinement (`--with_box_refine`), 200 queries = 100 pairs (`--num_queries 200`), the 'no objects' text
    (`--use_no_obj_token`). Where the paper (Sec. 3.1, Appendix F) and that code differ, the code wins: those
    weights were trained with it (see models/rlipv2/README.md for every difference).
    """

    # backbone: torchvision-layout ResNet (reference key names); `backbone` names ImageNet weights to start
    # training from (a transformers ResNet hub id or local dir), never needed to load a tagger checkpoint
    backbone: str = "microsoft/resnet-50"
    backbone_depths: tuple[int, ...] = (3, 4, 6, 3)
    backbone_widths: tuple[int, ...] = (64, 128, 256, 512)
    backbone_stem: int = 64
    # text encoder: roberta-base; one feature per phrase = the pooler output (tanh(dense(h_<s>)))
    text_model: str = "roberta-base"
    text_config: dict | None = None
    max_text_tokens: int = 512  # tokens per phrase: RoBERTa-base's limit; the reference does not truncate
    d_model: int = 256
    n_heads: int = 8
    n_points: int = 4
    d_ffn: int = 1024
    n_levels: int = 4
    gn_groups: int = 32  # GroupNorm(32, 256) after each input projection (Deformable DETR)
    enc_layers: int = 6
    fusion_interval: int = 2  # a fusion before encoder layers 0, 2, 4
    fusion_dim: int = 2048  # GLIP bi-attention embed dim (8 heads of 256)
    fusion_heads: int = 8
    fusion_gamma_init: float = 0.25  # 1 / num_feature_levels in the reference
    dec_layers: int = 3  # entity decoder; the relation decoder has as many
    n_q: int = 100  # pair slots per group: 200 queries = 100 subjects + 100 objects
    dropout: float = 0.1  # the reference's; inactive at inference
    # images: DETR resize (shorter side 800, longer at most 1333, truncating), ImageNet statistics
    min_size: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # the dataset's class keys scored by the subject/object heads (80 COCO or 365 Objects365 keys, in the
    # reference's order); "no objects" is appended as the last entity text
    entity_names: list[str] = field(default_factory=list)
    no_object_text: str = "no objects"
    # denoising while training (Appendix E, Table 4)
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
        if self.enc_layers % self.fusion_interval:
            raise ValueError(
                f"RLIPv2Config: enc_layers {self.enc_layers} is not a multiple of fusion_interval "
                f"{self.fusion_interval}"
            )
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(
                f"RLIPv2Config: fusion_dim {self.fusion_dim} not divisible by fusion_heads {self.fusion_heads}"
            )
        if self.n_levels != 4:
            raise ValueError(
                f"RLIPv2Config: n_levels {self.n_levels}; the architecture has 3 ResNet levels + 1"
            )
        if not 0.0 <= self.dn_label_flip <= 1.0 or self.dn_box_noise < 0:
            raise ValueError(
                f"RLIPv2Config: dn_label_flip {self.dn_label_flip} must be in [0, 1] and dn_box_noise "
                f"{self.dn_box_noise} >= 0"
            )
        self.pixel_mean = tuple(self.pixel_mean)
        self.pixel_std = tuple(self.pixel_std)
        self.backbone_depths = tuple(self.backbone_depths)
        self.backbone_widths = tuple(self.backbone_widths)

    @property
    def n_fusion(self) -> int:
        return self.enc_layers // self.fusion_interval

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        d["backbone_depths"] = list(self.backbone_depths)
        d["backbone_widths"] = list(self.backbone_widths)
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


# the fusion gates the reference's RLIPv2_BiAttentionBlockForCheckpoint has and reltag implements:
# "GLIP" = per-channel gammas (the tagger's default), "VXAc" = the first gamma as one scalar per direction
FUSION_GATINGS = ("GLIP", "VXAc")


@dataclass(slots=True)
class ParSeDAConfig(RLIPv2Config):
    """RLIPv2-ParSeDA (DAB-Deformable-DETR with the asymmetric language-image fusion), the paper's main model.

    Defaults: the flags of the reference's ParSeDA pre-training (JacobYuan7/RLIPv2,
    scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh): `--RLIP_ParSeDA_v2 --with_box_refine
    --num_feature_levels 4 --num_patterns 0 --dim_feedforward 2048 --dropout 0.0 --enc_layers 6 --dec_layers 3
    --num_queries 200 --fusion_type GLIP_attn --gating_mechanism VXAc --verb_query_tgt_type vanilla_MBF
    --fusion_interval 2 --fusion_last_vis --lang_aux_loss --subject_class --use_no_obj_token`. Backbone, position
    encoding, text encoder and fusion layout are ParSeD's (the same reference builders); what differs is the
    gate, the DAB decoders (anchor boxes -> sine embedding -> `ref_point_head`, scaled by `query_scale`) and the
    relation query content (`verb_tgt_generator`, a 16-branch MultiBranchFusion of the last subject and object
    states, plus the learned `verb_tgt_embed` rows). `--pe_temperatureH/W 20` are parsed but unused: the ResNet
    builder of ParSeDA (build_DDETR_backbone) uses DETR's PositionEmbeddingSine with temperature 10000.
    """

    d_ffn: int = 2048
    dropout: float = 0.0
    fusion_gating: str = "VXAc"
    fusion_dropout: float = (
        0.1  # RLIPv2_VLFuse builds its bi-attention with dropout=0.1 whatever --dropout says
    )
    mbf_cardinality: int = 16  # MultiBranchFusion(256, 256, 256, 16) in the reference

    def __post_init__(self) -> None:
        RLIPv2Config.__post_init__(self)  # slots dataclasses break zero-argument super()
        if self.fusion_gating not in FUSION_GATINGS:
            raise ValueError(
                f"ParSeDAConfig: fusion_gating {self.fusion_gating!r}; implemented: {list(FUSION_GATINGS)}"
            )
        if self.d_model % self.mbf_cardinality:
            raise ValueError(
                f"ParSeDAConfig: d_model {self.d_model} not divisible by mbf_cardinality {self.mbf_cardinality}"
            )
        if self.d_model % 4:
            raise ValueError(
                f"ParSeDAConfig: d_model {self.d_model} must be a multiple of 4 (box sine embedding)"
            )
        if self.n_fusion != self.dec_layers:
            raise ValueError(
                f"ParSeDAConfig: {self.n_fusion} fusion rounds but {self.dec_layers} decoder layers; the reference's "
                f"lang_aux_loss scores decoder layer l against fusion round l and needs one round per layer"
            )
