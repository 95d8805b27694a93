"""Hungarian matching of learned query pairs to annotated pairs, with the reference's costs (JacobYuan7/RLIPv2
models/matcher.py HungarianMatcherHOI, subject_class=True), scipy's linear_sum_assignment per image."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from models.rlipv2.boxes import cxcywh_to_xyxy, generalized_box_iou


@torch.no_grad()
def match_costs(
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
) -> dict[str, torch.Tensor]:
    """One image's cost terms, each Tensor[Q, P] (unweighted, as the reference's cost_list):

    - `sub_class` / `obj_class`: -softmax(logits)[label] (padded texts with -inf logits get probability 0);
    - `verb_class`: -(p . y / (|y| + 1e-4) + (1 - p) . (1 - y) / (|1 - y| + 1e-4)) / 2, p = sigmoid(rel logits);
    - `bbox`: max(L1(subject), L1(object)) (a target whose object box is all zero costs its subject's L1 only);
    - `giou`: max(-GIoU(subject), -GIoU(object)) = -min of the two GIoUs (an all-zero object box: -GIoU(subject)
      plus -GIoU(object) - GIoU(subject), as the reference writes it).

    Args:
        sub_boxes, obj_boxes: Tensor[Q, 4] (cx, cy, w, h); sub_logits, obj_logits: Tensor[Q, Te];
        rel_logits: Tensor[Q, Tr] (only the image's valid relation texts: padding changes the |1 - y| sums);
        tgt_*_boxes: Tensor[P, 4]; tgt_*_labels: Tensor[P] long; tgt_rels: Tensor[P, Tr] multi-hot (or soft).
    """
    p_sub = sub_logits.softmax(-1)
    p_obj = obj_logits.softmax(-1)
    p_rel = rel_logits.sigmoid()
    y = tgt_rels.to(p_rel.dtype)
    c_verb = -(
        (p_rel @ y.T) / (y.sum(-1)[None] + 1e-4) + ((1 - p_rel) @ (1 - y).T) / ((1 - y).sum(-1)[None] + 1e-4)
    )
    has_obj = (tgt_obj_boxes != 0).any(-1)[None]  # [1, P]
    c_bbox = torch.maximum(
        torch.cdist(sub_boxes, tgt_sub_boxes, p=1), torch.cdist(obj_boxes, tgt_obj_boxes, p=1) * has_obj
    )
    c_giou_sub = -generalized_box_iou(cxcywh_to_xyxy(sub_boxes), cxcywh_to_xyxy(tgt_sub_boxes))
    c_giou_obj = -generalized_box_iou(cxcywh_to_xyxy(obj_boxes), cxcywh_to_xyxy(tgt_obj_boxes))
    c_giou_obj = c_giou_obj + c_giou_sub * ~has_obj
    return {
        "sub_class": -p_sub[:, tgt_sub_labels],
        "obj_class": -p_obj[:, tgt_obj_labels],
        "verb_class": c_verb / 2,
        "bbox": c_bbox,
        "giou": torch.maximum(c_giou_sub, c_giou_obj),
    }


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
    cost_bbox: float = 2.5,
    cost_giou: float = 1.0,
    cost_obj_class: float = 1.0,
    cost_verb_class: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: C = cost_obj_class * (sub_class + obj_class) + cost_verb_class * verb_class + cost_bbox * bbox +
    cost_giou * giou (`match_costs`; the defaults are the pre-training scripts' `--set_cost_bbox 2.5
    --set_cost_giou 1` and main.py's `--set_cost_obj_class 1 --set_cost_verb_class 1`; the subject class uses the
    object class weight, as the reference).

    Returns: (query indices, target indices), Tensor[min(Q, P)] long each, sorted by query.
    """
    if tgt_sub_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    c = match_costs(
        sub_boxes, obj_boxes, sub_logits, obj_logits, rel_logits,
        tgt_sub_boxes, tgt_obj_boxes, tgt_sub_labels, tgt_obj_labels, tgt_rels,
    )  # fmt: skip
    cost = (
        cost_obj_class * (c["obj_class"] + c["sub_class"])
        + cost_verb_class * c["verb_class"]
        + cost_bbox * c["bbox"]
        + cost_giou * c["giou"]
    )
    qi, ti = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(qi, dtype=torch.long), torch.as_tensor(ti, dtype=torch.long)
