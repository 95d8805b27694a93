"""The reference's pre-training objective of RLIPv2-ParSeD and RLIPv2-ParSeDA (JacobYuan7/RLIPv2 models/hoi.py
SetCriterionHOI, with the loss flags both pre-training scripts pass), on a model-agnostic output dict.

Per decoder layer (the last one and, with aux_loss, every earlier one, each matched on its own):

    bbox_loss_coef * (loss_sub_bbox + loss_obj_bbox) + giou_loss_coef * (loss_sub_giou + loss_obj_giou)
    + obj_loss_coef * loss_obj_ce + verb_loss_coef * loss_verb_ce

- loss_sub_bbox = sum |b - b*| / N over matched subjects, N = annotated pairs in the batch (mean over ranks,
  >= 1); loss_obj_bbox = the same over matched objects with an object box, divided by (their count + 1e-4);
  the GIoU terms alike with 1 - GIoU (hoi.py loss_sub_obj_boxes).
- loss_obj_ce = CE(subject) + CE(object), each a class-weighted mean over ALL B x Q query slots: unmatched slots
  target "no objects" (the last entity text) with weight eos_coef, matched ones their label with weight 1
  (F.cross_entropy(weight=...) semantics: sum(w * ce) / sum(w); hoi.py loss_obj_labels, subject_class).
- loss_verb_ce: with giou_verb_label (Relation Quality Labels) the quality-focal loss
  -sum |y - p|^2 (y log p + (1 - y) log(1 - p)) / #{y > 0} over all slots and relation texts, y = the matched
  pair's multi-hot relations (plus Relation Pseudo-Labels with pseudo_verb) times (1 + min(GIoU_sub, GIoU_obj)) / 2
  of the matched boxes, 0 for unmatched slots (hoi.py loss_verb_labels, _soft_neg_loss); without it CornerNet's
  focal loss on the hard labels (_neg_loss). p = sigmoid(logit) clamped to [1e-6, 1 - 1e-6].
- Relation Pseudo-Labels (hoi.py RLIP_ParSeD.forward, pseudo_verb_mode "online"): d = Euclidean distances
  (with torch.pairwise_distance's eps 1e-6) between the relation texts' phrase features before fusion, similarity
  s[i, j] = max_k d[i, k] - d[i, j]; per pair t = y @ s divided by its maximum, its own labels set to 0, kept
  where > 0.3. Not detached: as in the reference, the text encoder gets gradient through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.rlipv2.boxes import cxcywh_to_xyxy, generalized_box_iou
from models.rlipv2.label_sequence import SAMPLING_STRATEGIES
from models.rlipv2.matcher import hungarian_match

LAYER_KEYS = ("sub_boxes", "obj_boxes", "sub_logits", "obj_logits", "rel_logits")
CLAMP_EPS = 1e-6  # the reference's eps in _neg_loss / _soft_neg_loss


@dataclass(frozen=True)
class LossSettings:
    """Every flag and weight of the pre-training objective. Defaults: the reference's RLIPv2-ParSeD and
    RLIPv2-ParSeDA pre-training scripts (scripts/RLIP_ParSeD/train_RLIP_ParSeD_v2_mixed_vgcocoo365_resnet.sh and
    scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh pass the same loss flags), main.py's
    argparse defaults where they pass none. Denoising is not part of it: the reference's box / label noise acts
    only with --verb_tagger (R-Tagger training, models.rlipv2.train.tagger_loss)."""

    bbox_loss_coef: float = 2.5  # --bbox_loss_coef 2.5 (main.py default 5)
    giou_loss_coef: float = 1.0  # --giou_loss_coef 1 (main.py default 2)
    obj_loss_coef: float = 1.0  # --obj_loss_coef (default)
    verb_loss_coef: float = 1.0  # --verb_loss_coef (default)
    eos_coef: float = 0.1  # --eos_coef (default): weight of "no objects" in the class CE
    set_cost_bbox: float = 2.5  # --set_cost_bbox 2.5 (main.py default 5)
    set_cost_giou: float = 1.0  # --set_cost_giou 1 (main.py default 2)
    set_cost_obj_class: float = 1.0  # --set_cost_obj_class (default); weighs the subject class cost too
    set_cost_verb_class: float = 1.0  # --set_cost_verb_class (default)
    aux_loss: bool = True  # main.py default (--no_aux_loss turns it off): the loss on every decoder layer
    lang_aux_loss: bool = True  # --lang_aux_loss: decoder layer l scored against fusion round l (model side)
    giou_verb_label: bool = True  # --giou_verb_label: Relation Quality Labels
    pseudo_verb: bool = True  # --pseudo_verb: Relation Pseudo-Labels
    pseudo_verb_threshold: float = 0.3  # sim_thre, a constant in hoi.py
    negative_text_sampling: int = 500  # --negative_text_sampling 500: Label Sequence Extension length
    sampling_strategy: str = "freq"  # --sampling_stategy freq (the reference's spelling)

    def __post_init__(self) -> None:
        for name in ("bbox_loss_coef", "giou_loss_coef", "obj_loss_coef", "verb_loss_coef", "eos_coef",
                     "set_cost_bbox", "set_cost_giou", "set_cost_obj_class", "set_cost_verb_class"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"LossSettings: {name} must be >= 0, got {getattr(self, name)}")
        costs = (self.set_cost_bbox, self.set_cost_giou, self.set_cost_obj_class, self.set_cost_verb_class)
        if not any(costs):
            raise ValueError(
                f"LossSettings: all matching costs are 0 {costs}; the matching would be arbitrary"
            )
        if self.pseudo_verb and not self.giou_verb_label:
            raise ValueError(
                "LossSettings: pseudo_verb needs giou_verb_label (the reference adds Relation Pseudo-Labels only "
                "to the quality-label targets; without them it ignores pseudo_verb)"
            )
        if not 0.0 <= self.pseudo_verb_threshold < 1.0:
            raise ValueError(
                f"LossSettings: pseudo_verb_threshold {self.pseudo_verb_threshold} not in [0, 1)"
            )
        if self.negative_text_sampling < 0:
            raise ValueError(f"LossSettings: negative_text_sampling {self.negative_text_sampling} < 0")
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(
                f"LossSettings: sampling_strategy {self.sampling_strategy!r} is not one of {SAMPLING_STRATEGIES}"
            )


@dataclass(slots=True)
class PairTargets:
    """One image's annotated pairs. sub_boxes, obj_boxes Tensor[P, 4] (cx, cy, w, h) in [0, 1] (an all-zero
    object box means "no object box", as in the reference); sub_labels, obj_labels Tensor[P] long (index into the
    image's entity texts); rels Tensor[P, Tr] multi-hot over the image's relation texts (the outputs' Tr)."""

    sub_boxes: torch.Tensor
    obj_boxes: torch.Tensor
    sub_labels: torch.Tensor
    obj_labels: torch.Tensor
    rels: torch.Tensor


def relation_similarity(phrases: torch.Tensor) -> torch.Tensor:
    """The reference's relation-text similarity: s[i, j] = max_k d[i, k] - d[i, j], d[i, j] = ||x_i - x_j + 1e-6||
    (torch.pairwise_distance's eps, the reference's metric; here pairwise by cdist without the matmul shortcut,
    which would lose the near-zero diagonal to cancellation). phrases Tensor[Tr, R] -> Tensor[Tr, Tr]."""
    x = phrases[None]
    d = torch.cdist(x + 1e-6, x, p=2, compute_mode="donot_use_mm_for_euclid_dist")[0]
    return d.max(-1, keepdim=True).values - d


def pseudo_labels(sim: torch.Tensor, rels: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Relation Pseudo-Labels of one image's pairs (the reference's target_verb_sim).

    Args: sim Tensor[Tr, Tr] (relation_similarity of the relation texts' features before fusion); rels
        Tensor[P, Tr] multi-hot.
    Returns: Tensor[P, Tr], 0 on each pair's own labels and below `threshold`. A pair whose similarity row is all
    0 (one relation text, or identical features) gets none (the reference divides 0 by 0 there).
    """
    t = rels.to(sim.dtype) @ sim  # [P, Tr]: sum over the pair's labels i of sim[i, j]
    if t.shape[0]:
        m = t.max(-1, keepdim=True).values
        t = torch.where(m > 0, t / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(t))
    t = t.masked_fill(rels.bool(), 0.0)
    return t * (t > threshold)


def _num_interactions(targets: list[PairTargets], device) -> float:
    """Annotated pairs in the batch, averaged over ranks under torch.distributed, at least 1 (hoi.py forward)."""
    n = torch.as_tensor([float(sum(len(t.sub_labels) for t in targets))], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return float(n.clamp(min=1).item())


class Criterion:
    """The pre-training objective (module docstring) on an output dict.

    outputs: `sub_boxes`, `obj_boxes` Tensor[B, Q, 4], `sub_logits`, `obj_logits` Tensor[B, Q, Te], `rel_logits`
    Tensor[B, Q, Tr] (the last decoder layer); `aux`: list of dicts with those keys for the earlier layers
    (earliest first; needed with aux_loss); `rel_phrases` Tensor[B, Tr, R] the relation texts' features before
    fusion (needed with pseudo_verb); optional `entity_pad` Tensor[B, Te] / `rel_pad` Tensor[B, Tr] bool, True =
    padded text. "no objects" is the last unpadded entity text of each image.
    targets: one PairTargets per image.

    Returns: `loss` (the total), the weighted reference terms `loss_sub_bbox`, `loss_obj_bbox`, `loss_sub_giou`,
    `loss_obj_giou`, `loss_obj_ce`, `loss_verb_ce` (last layer; `_0`, `_1`, ... for the aux layers), and summaries
    over all layers: `loss_l1`, `loss_giou`, `loss_cls` (class CE of matched slots), `loss_noobj` (of unmatched
    slots), `loss_rel`; loss = loss_l1 + loss_giou + loss_cls + loss_noobj + loss_rel.
    """

    def __init__(self, settings: LossSettings = LossSettings()):
        self.settings = settings

    def __call__(self, outputs: dict, targets: list[PairTargets]) -> dict[str, torch.Tensor]:
        s = self.settings
        for k in LAYER_KEYS:
            if k not in outputs:
                raise ValueError(f"criterion: the output dict has no {k!r} (keys: {sorted(outputs)})")
        b, q, te = outputs["sub_logits"].shape
        tr = outputs["rel_logits"].shape[-1]
        if len(targets) != b:
            raise ValueError(f"criterion: {b} images in the outputs but {len(targets)} targets")
        device = outputs["sub_logits"].device
        ent_pad = outputs.get("entity_pad")
        rel_pad = outputs.get("rel_pad")
        ent_valid = torch.ones(b, te, dtype=torch.bool, device=device) if ent_pad is None else ~ent_pad
        rel_valid = torch.ones(b, tr, dtype=torch.bool, device=device) if rel_pad is None else ~rel_pad
        no_object = ent_valid.long().cumsum(-1).argmax(-1)  # index of the last valid entity text per image
        for i, t in enumerate(targets):
            if t.rels.shape[-1] != tr:
                raise ValueError(
                    f"criterion: image {i} has {t.rels.shape[-1]} relation targets, outputs {tr}"
                )
        pseudo = None
        if s.pseudo_verb:
            if "rel_phrases" not in outputs:
                raise ValueError(
                    "criterion: pseudo_verb needs the output 'rel_phrases' (features before fusion)"
                )
            pseudo, last = [], None
            for i, t in enumerate(targets):
                v = rel_valid[i]
                phrases = outputs["rel_phrases"][i][v]
                # texts shared by the batch (the reference's case): one similarity matrix, as the reference
                # computes it once from image 0's features
                if last is None or not (torch.equal(last[0], v) and torch.equal(last[1], phrases)):
                    last = (v, phrases, relation_similarity(phrases))
                full = t.rels.new_zeros(t.rels.shape, dtype=phrases.dtype)
                full[:, v] = pseudo_labels(last[2], t.rels[:, v], s.pseudo_verb_threshold)
                pseudo.append(full)
        layers = [outputs]
        if s.aux_loss:
            if "aux" not in outputs:
                raise ValueError("criterion: aux_loss needs the output 'aux' (the earlier decoder layers)")
            layers = list(outputs["aux"]) + [outputs]
        n_inter = _num_interactions(targets, device)
        terms: dict[str, torch.Tensor] = {}
        summary = dict.fromkeys(("loss_l1", "loss_giou", "loss_cls", "loss_noobj", "loss_rel"), 0.0)
        for lvl, layer in enumerate(layers):
            suffix = "" if lvl == len(layers) - 1 else f"_{lvl}"
            got = self.layer_terms(layer, targets, n_inter, no_object, ent_valid, rel_valid, pseudo)
            w = {
                "loss_sub_bbox": s.bbox_loss_coef, "loss_obj_bbox": s.bbox_loss_coef,
                "loss_sub_giou": s.giou_loss_coef, "loss_obj_giou": s.giou_loss_coef,
                "loss_obj_ce": s.obj_loss_coef, "loss_verb_ce": s.verb_loss_coef,
            }  # fmt: skip
            for k, wk in w.items():
                terms[k + suffix] = wk * got[k]
            summary["loss_l1"] = (
                summary["loss_l1"] + terms["loss_sub_bbox" + suffix] + terms["loss_obj_bbox" + suffix]
            )
            summary["loss_giou"] = (
                summary["loss_giou"] + terms["loss_sub_giou" + suffix] + terms["loss_obj_giou" + suffix]
            )
            summary["loss_cls"] = summary["loss_cls"] + s.obj_loss_coef * got["ce_matched"]
            summary["loss_noobj"] = summary["loss_noobj"] + s.obj_loss_coef * got["ce_unmatched"]
            summary["loss_rel"] = summary["loss_rel"] + terms["loss_verb_ce" + suffix]
        total = sum(v for k, v in terms.items())
        return {"loss": total, **terms, **summary}

    def layer_terms(self, layer, targets, n_inter, no_object, ent_valid, rel_valid, pseudo) -> dict:
        """One decoder layer's unweighted terms (its own Hungarian matching), plus the class CE split into the
        matched and unmatched slots' shares (ce_matched + ce_unmatched = loss_obj_ce)."""
        s = self.settings
        b, q, _ = layer["sub_logits"].shape
        dtype = layer["sub_boxes"].dtype
        matched = []
        for i, t in enumerate(targets):
            rv = rel_valid[i]
            qi, ti = hungarian_match(
                layer["sub_boxes"][i], layer["obj_boxes"][i], layer["sub_logits"][i], layer["obj_logits"][i],
                layer["rel_logits"][i][:, rv], t.sub_boxes, t.obj_boxes, t.sub_labels, t.obj_labels, t.rels[:, rv],
                cost_bbox=s.set_cost_bbox, cost_giou=s.set_cost_giou, cost_obj_class=s.set_cost_obj_class,
                cost_verb_class=s.set_cost_verb_class,
            )  # fmt: skip
            matched.append((qi.to(t.sub_boxes.device), ti.to(t.sub_boxes.device)))

        def gather(key, tkey):
            pred = torch.cat([layer[key][i][qi] for i, (qi, _) in enumerate(matched)])
            tgt = torch.cat([getattr(t, tkey)[ti] for t, (_, ti) in zip(targets, matched)])
            return pred, tgt.to(pred.dtype)

        sb, tsb = gather("sub_boxes", "sub_boxes")
        ob, tob = gather("obj_boxes", "obj_boxes")
        has_obj = (tob != 0).any(-1).to(dtype)
        n_obj = has_obj.sum() + 1e-4  # hoi.py: exist_obj_boxes.sum() + 1e-4
        out = {
            "loss_sub_bbox": (sb - tsb).abs().sum() / n_inter,
            "loss_obj_bbox": ((ob - tob).abs() * has_obj[:, None]).sum() / n_obj,
        }
        if sb.shape[0]:
            g_sub = torch.diag(generalized_box_iou(cxcywh_to_xyxy(sb), cxcywh_to_xyxy(tsb)))
            g_obj = torch.diag(generalized_box_iou(cxcywh_to_xyxy(ob), cxcywh_to_xyxy(tob)))
        else:
            g_sub = g_obj = sb.new_zeros(0)
        out["loss_sub_giou"] = (1 - g_sub).sum() / n_inter
        out["loss_obj_giou"] = ((1 - g_obj) * has_obj).sum() / n_obj

        # class CE over all slots: "no objects" for unmatched slots (weight eos_coef), the label for matched ones
        is_matched = torch.zeros(b, q, dtype=torch.bool, device=sb.device)
        for i, (qi, _) in enumerate(matched):
            is_matched[i, qi] = True
        ce_matched = ce_unmatched = 0.0
        for key, tkey in (("obj_logits", "obj_labels"), ("sub_logits", "sub_labels")):
            tgt = no_object[:, None].expand(b, q).clone()
            for i, (t, (qi, ti)) in enumerate(zip(targets, matched)):
                tgt[i, qi] = getattr(t, tkey)[ti]
            logp = layer[key].log_softmax(-1)
            ce = -logp.gather(-1, tgt[..., None])[..., 0]  # [B, Q]
            w = torch.where(tgt == no_object[:, None], torch.full_like(ce, s.eos_coef), torch.ones_like(ce))
            denom = w.sum()
            ce_matched = ce_matched + (w * ce * is_matched).sum() / denom
            ce_unmatched = ce_unmatched + (w * ce * ~is_matched).sum() / denom
        out["loss_obj_ce"] = ce_matched + ce_unmatched
        out["ce_matched"], out["ce_unmatched"] = ce_matched, ce_unmatched

        # relation targets: hard multi-hot, or soft (quality labels x (labels + pseudo-labels))
        logits = layer["rel_logits"]
        y = torch.zeros_like(logits)
        for i, (t, (qi, ti)) in enumerate(zip(targets, matched)):
            lab = t.rels[ti].to(logits.dtype)
            if s.giou_verb_label:
                with torch.no_grad():  # the reference reads the quality from the matcher's (no-grad) costs
                    gs = generalized_box_iou(
                        cxcywh_to_xyxy(layer["sub_boxes"][i][qi]), cxcywh_to_xyxy(t.sub_boxes[ti])
                    )
                    go = generalized_box_iou(
                        cxcywh_to_xyxy(layer["obj_boxes"][i][qi]), cxcywh_to_xyxy(t.obj_boxes[ti])
                    )
                    gs, go = torch.diag(gs), torch.diag(go)
                    no_box = ~(t.obj_boxes[ti] != 0).any(-1)
                    # cost_giou = max(-gs, -go - gs * no_box); quality = (1 - cost_giou) / 2
                    quality = (1 - torch.maximum(-gs, -go - gs * no_box)) / 2
                if pseudo is not None:
                    lab = lab + pseudo[i][ti]
                lab = lab * quality[:, None].to(logits.dtype)
            y[i, qi] = lab
        valid = rel_valid[:, None, :].to(logits.dtype)
        p = logits.masked_fill(~rel_valid[:, None, :], 0.0).sigmoid().clamp(CLAMP_EPS, 1 - CLAMP_EPS)
        if s.giou_verb_label:  # _soft_neg_loss (quality focal, beta 2)
            loss = (y - p).abs().pow(2) * ((1 - y) * torch.log(1 - p) + y * torch.log(p))
            num_pos = ((y > 0).to(dtype) * valid).sum()
        else:  # _neg_loss (CornerNet)
            pos = (y == 1).to(dtype)
            neg = (y < 1).to(dtype)
            loss = torch.log(p) * (1 - p) ** 2 * pos + torch.log(1 - p) * p**2 * (1 - y) ** 4 * neg
            num_pos = (pos * valid).sum()
        total = (loss * valid).sum()
        out["loss_verb_ce"] = -total / num_pos if float(num_pos) > 0 else -total
        return out
