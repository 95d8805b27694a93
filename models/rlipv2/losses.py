"""R-Tagger training losses (Eq. 6): L1 (2.5) + GIoU (1) on subject/object boxes, CE (1) on their classes, focal
(1) on relations. Pre-training uses the reference's objective instead (models/rlipv2/criterion.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.rlipv2.boxes import cxcywh_to_xyxy, generalized_box_iou
from models.rlipv2.config import RLIPv2Config


def sigmoid_focal_loss(logits, targets, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise focal loss (Lin et al. 2017); logits/targets same shape, returns the same shape."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def pair_losses(
    cfg: RLIPv2Config,
    sub_boxes,
    obj_boxes,
    sub_logits,
    obj_logits,
    rel_logits,
    tgt_sub_boxes,
    tgt_obj_boxes,
    tgt_sub_labels,
    tgt_obj_labels,
    tgt_rels,
    rel_valid,
) -> dict[str, torch.Tensor]:
    """Losses over M matched (query, target) pairs (already gathered).

    Args:
        sub_boxes, obj_boxes, tgt_*_boxes: Tensor[M, 4]; sub_logits, obj_logits: Tensor[M, Te];
        rel_logits: Tensor[M, Tr]; tgt_*_labels: Tensor[M] long; tgt_rels: Tensor[M, Tr] multi-hot;
        rel_valid: Tensor[M, Tr] bool, False for padded relation phrases (excluded).

    Returns: dict of the four weighted terms and their sum under "loss".
    """
    m = max(sub_boxes.shape[0], 1)
    l1 = (
        F.l1_loss(sub_boxes, tgt_sub_boxes, reduction="sum")
        + F.l1_loss(obj_boxes, tgt_obj_boxes, reduction="sum")
    ) / m
    giou = (
        (1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(sub_boxes), cxcywh_to_xyxy(tgt_sub_boxes)))).sum()
        + (
            1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(obj_boxes), cxcywh_to_xyxy(tgt_obj_boxes)))
        ).sum()
    ) / m
    cls = F.cross_entropy(sub_logits, tgt_sub_labels, reduction="sum") / m
    cls = cls + F.cross_entropy(obj_logits, tgt_obj_labels, reduction="sum") / m
    safe = rel_logits.masked_fill(~rel_valid, 0.0)  # padded phrases carry -inf logits
    focal = sigmoid_focal_loss(safe, tgt_rels.to(safe.dtype), cfg.focal_alpha, cfg.focal_gamma)
    rel = (focal * rel_valid).sum() / m
    terms = {
        "loss_l1": cfg.w_l1 * l1,
        "loss_giou": cfg.w_giou * giou,
        "loss_cls": cfg.w_cls * cls,
        "loss_rel": cfg.w_rel * rel,
    }
    terms["loss"] = sum(terms.values())
    return terms
