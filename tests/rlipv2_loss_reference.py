"""The reference's pre-training loss restated in plain float64 Python (tests only): every term of JacobYuan7/RLIPv2
models/hoi.py SetCriterionHOI (loss_obj_labels with subject_class, loss_sub_obj_boxes, loss_verb_labels with
_soft_neg_loss / _neg_loss), its HungarianMatcherHOI (models/matcher.py, subject_class=True) and the online
Relation Pseudo-Labels of RLIP_ParSeD.forward, written from reading that code with loops over scalars and a
brute-force assignment (tiny sizes only), independent of models.rlipv2.criterion.

Inputs are nested Python lists / tensors converted with .tolist(); texts are shared by the batch (the reference
merges them per batch), so there is no padding here.
"""

from __future__ import annotations

import itertools
import math


def _xyxy(b):
    cx, cy, w, h = b
    return (cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h)


def giou(a, b) -> float:
    """Generalized IoU of two (cx, cy, w, h) boxes (util/box_ops.py generalized_box_iou, one pair)."""
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = (bx1 - bx0) * (by1 - by0)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / union
    ew = max(0.0, max(ax1, bx1) - min(ax0, bx0))
    eh = max(0.0, max(ay1, by1) - min(ay0, by0))
    enclose = ew * eh
    return iou - (enclose - union) / enclose


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def l1(a, b):
    return sum(abs(x - y) for x, y in zip(a, b))


def has_box(b):
    return any(x != 0 for x in b)


def pair_cost(layer, i, q, t, tgt, w):
    """C[q, t] of image i (HungarianMatcherHOI.forward, subject_class branch)."""
    ps = softmax(layer["sub_logits"][i][q])
    po = softmax(layer["obj_logits"][i][q])
    pv = [sigmoid(x) for x in layer["rel_logits"][i][q]]
    y = tgt["rels"][t]
    n_pos = sum(y)
    n_neg = sum(1 - v for v in y)
    c_verb = (
        -(
            sum(p * v for p, v in zip(pv, y)) / (n_pos + 1e-4)
            + sum((1 - p) * (1 - v) for p, v in zip(pv, y)) / (n_neg + 1e-4)
        )
        / 2
    )
    c_sub_cls = -ps[tgt["sub_labels"][t]]
    c_obj_cls = -po[tgt["obj_labels"][t]]
    sb, ob = layer["sub_boxes"][i][q], layer["obj_boxes"][i][q]
    tsb, tob = tgt["sub_boxes"][t], tgt["obj_boxes"][t]
    exist = 1.0 if has_box(tob) else 0.0
    c_bbox = max(l1(sb, tsb), l1(ob, tob) * exist)
    c_sub_giou = -giou(sb, tsb)
    c_obj_giou = -giou(ob, tob) + c_sub_giou * (1.0 - exist)
    c_giou = max(c_sub_giou, c_obj_giou)
    return (w["obj_class"] * c_obj_cls + w["obj_class"] * c_sub_cls + w["verb_class"] * c_verb
            + w["bbox"] * c_bbox + w["giou"] * c_giou), c_giou  # fmt: skip


def brute_force_match(layer, i, tgt, w):
    """The assignment of image i's targets to distinct queries with the least total cost, by enumeration;
    returned as (query, target) pairs sorted by query, with each pair's cost_giou."""
    n_q = len(layer["sub_boxes"][i])
    n_t = len(tgt["sub_labels"])
    cost = [[pair_cost(layer, i, q, t, tgt, w) for t in range(n_t)] for q in range(n_q)]
    best, best_perm = None, None
    for perm in itertools.permutations(range(n_q), n_t):  # perm[t] = query of target t
        c = sum(cost[perm[t]][t][0] for t in range(n_t))
        if best is None or c < best - 1e-12:
            best, best_perm = c, perm
    pairs = sorted((best_perm[t], t) for t in range(n_t)) if n_t else []
    return [(q, t, cost[q][t][1]) for q, t in pairs], best


def pseudo_labels(phrases, rels, threshold=0.3):
    """target_verb_sim (RLIP_ParSeD.forward, pseudo_verb_mode 'online'): phrases [V][R] (before fusion), rels
    [N][V] multi-hot -> [N][V]."""
    v = len(phrases)
    # F.pairwise_distance(x1, x2, p=2, eps=1e-6) = || x1 - x2 + eps ||_2
    d = [
        [math.sqrt(sum((a - b + 1e-6) ** 2 for a, b in zip(phrases[i], phrases[j]))) for j in range(v)]
        for i in range(v)
    ]
    sim = [[max(d[i]) - d[i][j] for j in range(v)] for i in range(v)]
    out = []
    for y in rels:
        row = [sum(y[i] * sim[i][j] for i in range(v)) for j in range(v)]
        m = max(row)
        row = [x / m for x in row]
        row = [0.0 if y[j] != 0 else row[j] for j in range(v)]
        out.append([x if x > threshold else 0.0 for x in row])
    return out


def layer_losses(layer, targets, w, eos_coef, giou_verb_label, pseudo):
    """Unweighted terms of one decoder layer: its own matching, then loss_sub_obj_boxes, loss_obj_labels
    (subject_class, cross_entropy with eos weights), loss_verb_labels (focal)."""
    b = len(layer["sub_boxes"])
    matches = [brute_force_match(layer, i, targets[i], w)[0] for i in range(b)]
    num_inter = max(float(sum(len(t["sub_labels"]) for t in targets)), 1.0)
    out = {}
    # boxes
    s_l1 = o_l1 = s_g = o_g = 0.0
    n_exist = 0
    for i, m in enumerate(matches):
        for q, t, _ in m:
            tgt = targets[i]
            s_l1 += l1(layer["sub_boxes"][i][q], tgt["sub_boxes"][t])
            s_g += 1 - giou(layer["sub_boxes"][i][q], tgt["sub_boxes"][t])
            if has_box(tgt["obj_boxes"][t]):
                n_exist += 1
                o_l1 += l1(layer["obj_boxes"][i][q], tgt["obj_boxes"][t])
                o_g += 1 - giou(layer["obj_boxes"][i][q], tgt["obj_boxes"][t])
    out["loss_sub_bbox"] = s_l1 / num_inter
    out["loss_obj_bbox"] = o_l1 / (n_exist + 1e-4)
    out["loss_sub_giou"] = s_g / num_inter
    out["loss_obj_giou"] = o_g / (n_exist + 1e-4)
    # classes: weighted mean CE over every slot; unmatched -> the last text ("no objects")
    ce_total = 0.0
    for key, lkey in (("obj_logits", "obj_labels"), ("sub_logits", "sub_labels")):
        num = den = 0.0
        for i in range(b):
            n_q = len(layer[key][i])
            n_cls = len(layer[key][i][0])
            target = [n_cls - 1] * n_q
            for q, t, _ in matches[i]:
                target[q] = targets[i][lkey][t]
            for q in range(n_q):
                row = layer[key][i][q]
                m = max(row)
                lse = m + math.log(sum(math.exp(x - m) for x in row))
                wq = eos_coef if target[q] == n_cls - 1 else 1.0
                num += wq * (lse - row[target[q]])
                den += wq
        ce_total += num / den
    out["loss_obj_ce"] = ce_total
    # relations
    total = 0.0
    num_pos = 0.0
    g_index = 0  # the reference indexes target_verb_sim by the target's position in the batch
    for i in range(b):
        n_q = len(layer["rel_logits"][i])
        gt = [[0.0] * len(layer["rel_logits"][i][0]) for _ in range(n_q)]
        for q, t, c_giou in matches[i]:
            lab = list(targets[i]["rels"][t])
            if giou_verb_label:
                soft = (-c_giou + 1) / 2
                if pseudo is not None:
                    lab = [a + p for a, p in zip(lab, pseudo[g_index + t])]
                lab = [a * soft for a in lab]
            gt[q] = lab
        g_index += len(targets[i]["sub_labels"])
        for q in range(n_q):
            for j, x in enumerate(layer["rel_logits"][i][q]):
                p = min(max(sigmoid(x), 1e-6), 1 - 1e-6)
                y = gt[q][j]
                if giou_verb_label:
                    total += abs(y - p) ** 2 * ((1 - y) * math.log(1 - p) + y * math.log(p))
                    num_pos += 1 if y > 0 else 0
                else:
                    if y == 1:
                        total += math.log(p) * (1 - p) ** 2
                        num_pos += 1
                    else:
                        total += math.log(1 - p) * p**2 * (1 - y) ** 4
    out["loss_verb_ce"] = -total / num_pos if num_pos > 0 else -total
    return out


def reference_losses(outputs, targets, *, bbox=2.5, giou_w=1.0, obj=1.0, verb=1.0, eos_coef=0.1, cost_bbox=2.5,
                     cost_giou=1.0, cost_obj_class=1.0, cost_verb_class=1.0, aux_loss=True, giou_verb_label=True,
                     pseudo_verb=True, threshold=0.3):  # fmt: skip
    """The weighted terms (weight_dict applied) by the reference's names, and their sum under "loss".

    outputs: {"layers": [layer dict with sub_boxes, obj_boxes, sub_logits, obj_logits, rel_logits as nested
    lists [B][Q][...]], earliest first, last = final}, "rel_phrases": [V][R] (image 0's, shared)};
    targets: per image {sub_boxes, obj_boxes, sub_labels, obj_labels, rels} as lists.
    """
    w = {"bbox": cost_bbox, "giou": cost_giou, "obj_class": cost_obj_class, "verb_class": cost_verb_class}
    pseudo = None
    if pseudo_verb:
        all_rels = [r for t in targets for r in t["rels"]]
        pseudo = pseudo_labels(outputs["rel_phrases"], all_rels, threshold)
    layers = outputs["layers"] if aux_loss else outputs["layers"][-1:]
    coef = {"loss_sub_bbox": bbox, "loss_obj_bbox": bbox, "loss_sub_giou": giou_w, "loss_obj_giou": giou_w,
            "loss_obj_ce": obj, "loss_verb_ce": verb}  # fmt: skip
    terms = {}
    for lvl, layer in enumerate(layers):
        suffix = "" if lvl == len(layers) - 1 else f"_{lvl}"
        for k, v in layer_losses(layer, targets, w, eos_coef, giou_verb_label, pseudo).items():
            terms[k + suffix] = coef[k] * v
    terms["loss"] = sum(terms.values())
    return terms
