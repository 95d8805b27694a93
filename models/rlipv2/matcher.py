"""Hungarian matching of learned query pairs to annotated relation pairs (scipy linear_sum_assignment)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from models.rlipv2.boxes import cxcywh_to_xyxy, generalized_box_iou


@torch.no_grad()
def hungarian_match(
    sub_boxes: torch.Tensor,
    obj_boxes: torch.Tensor,
    sub_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    rel_logits: torch.Tensor,
    tgt_sub_boxes: torch.Tensor,
    tgt_obj_boxes: torch.Tensor,
    tgt_sub_labels: torch.Tensor,
    tgt_obj_labels: torch.Tensor,
    tgt_rels: torch.Tensor,
    w_l1: float = 2.5,
    w_giou: float = 1.0,
    w_cls: float = 1.0,
    w_rel: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: cost = the loss weights of Eq. 6 on the matching costs (boxes of subject and object summed).

    Args:
        sub_boxes, obj_boxes: Tensor[Q, 4]; sub_logits, obj_logits: Tensor[Q, Te]; rel_logits: Tensor[Q, Tr].
        tgt_*_boxes: Tensor[P, 4]; tgt_*_labels: Tensor[P] long; tgt_rels: Tensor[P, Tr] multi-hot.

    Returns: (query indices, target indices), Tensor[min(Q, P)] each, sorted by query.
    """
    if tgt_sub_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    c_l1 = torch.cdist(sub_boxes, tgt_sub_boxes, p=1) + torch.cdist(obj_boxes, tgt_obj_boxes, p=1)
    c_giou = -generalized_box_iou(
        cxcywh_to_xyxy(sub_boxes), cxcywh_to_xyxy(tgt_sub_boxes)
    ) - generalized_box_iou(cxcywh_to_xyxy(obj_boxes), cxcywh_to_xyxy(tgt_obj_boxes))
    c_cls = -sub_logits.softmax(-1)[:, tgt_sub_labels] - obj_logits.softmax(-1)[:, tgt_obj_labels]
    # relation cost: mean sigmoid disagreement over the target's multi-hot relation vector
    p = rel_logits.sigmoid().nan_to_num(0.0)
    t = tgt_rels.to(p.dtype)
    c_rel = (
        -(p @ t.T) / t.sum(-1).clamp(min=1)[None] - ((1 - p) @ (1 - t).T) / (1 - t).sum(-1).clamp(min=1)[None]
    )
    cost = w_l1 * c_l1 + w_giou * c_giou + w_cls * c_cls + w_rel * c_rel
    qi, ti = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(qi, dtype=torch.long), torch.as_tensor(ti, dtype=torch.long)
