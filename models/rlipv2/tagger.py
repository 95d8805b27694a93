"""R-Tagger inference (RLIPv2 Sec. 4.2.2): score annotated subject-object pairs against relation texts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.rlipv2.model import RLIPv2ParSeD


@dataclass(slots=True)
class TagImage:
    """One image to tag.

    pixels: Tensor[3, H, W] normalised (see preprocess); boxes: Tensor[n_boxes, 4] (cx, cy, w, h) in [0, 1];
    labels: class name per box; groups: per forward, the (subject, object) box-index pairs (<= N_Q each);
    rel_texts: the image's relation texts, every pair gets a sigmoid for each.
    """

    pixels: torch.Tensor
    boxes: torch.Tensor
    labels: list[str]
    groups: list[list[tuple[int, int]]]
    rel_texts: list[str]


@dataclass(slots=True)
class GroupScores:
    """Per group: p_subject Tensor[P], p_object Tensor[P] (top-1 softmax), p_relation Tensor[P, Tr] (sigmoid)."""

    p_subject: torch.Tensor
    p_object: torch.Tensor
    p_relation: torch.Tensor


def entity_phrases(model: RLIPv2ParSeD, labels: list[str]) -> list[str]:
    """The entity phrases of an image: the model's vocabulary plus the image's labels, sorted, "no objects" last."""
    names = sorted(set(model.cfg.entity_names) | set(labels))
    if model.cfg.no_object_text in names:
        raise ValueError(f"class name {model.cfg.no_object_text!r} collides with the 'no objects' phrase")
    return names + [model.cfg.no_object_text]


def pad_images(pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the largest H and W (bottom/right) -> (Tensor[B, 3, H, W], mask Tensor[B, H, W] bool, True = pad)."""
    h = max(p.shape[1] for p in pixels)
    w = max(p.shape[2] for p in pixels)
    out = pixels[0].new_zeros(len(pixels), 3, h, w)
    mask = torch.ones(len(pixels), h, w, dtype=torch.bool, device=pixels[0].device)
    for i, p in enumerate(pixels):
        out[i, :, : p.shape[1], : p.shape[2]] = p
        mask[i, : p.shape[1], : p.shape[2]] = False
    return out, mask


@torch.no_grad()
def tag_images(
    model: RLIPv2ParSeD, images: list[TagImage], n_q: int, reference_style: bool = False
) -> tuple[list[list[GroupScores]], dict]:
    """Score every group of every image; one backbone+encoder pass per image, all groups decoded together.

    Every group is padded to exactly n_q slots (empty slots masked), so a pair's scores do not depend on how
    many other pairs share its group's padding. reference_style=True reproduces the reference code's
    cost model for benchmarks: the image is repeated once per group in the batch (one encoder pass per
    group) and every phrase is re-encoded by RoBERTa in every forward (no cache); scores are the same.

    Returns: per image, per group, GroupScores; and counters (encoder_passes, decoder_groups).
    """
    model.eval()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    images = [im for im in images]
    for k, im in enumerate(images):
        for g, grp in enumerate(im.groups):
            if not 0 < len(grp) <= n_q:
                raise ValueError(f"image {k} group {g} has {len(grp)} pairs; a group needs 1..{n_q} (N_Q)")
    ents = [entity_phrases(model, im.labels) for im in images]
    if reference_style:
        # one batch row per group: the image is re-encoded for each of its groups
        rows = [(k, g) for k, im in enumerate(images) for g in range(len(im.groups))]
        px, pmask = pad_images([images[k].pixels.to(dev, dtype) for k, _ in rows])
        state = model.encode(
            px,
            pmask,
            [ents[k] for k, _ in rows],
            [images[k].rel_texts for k, _ in rows],
            use_phrase_cache=False,
        )
        img_index = torch.arange(len(rows), device=dev)
        n_enc = len(rows)
    else:
        rows = [(k, g) for k, im in enumerate(images) for g in range(len(im.groups))]
        px, pmask = pad_images([im.pixels.to(dev, dtype) for im in images])
        state = model.encode(px, pmask, ents, [im.rel_texts for im in images])
        img_index = torch.tensor([k for k, _ in rows], dtype=torch.long, device=dev)
        n_enc = len(images)
    if not rows:
        return [[] for _ in images], {"encoder_passes": 0, "decoder_groups": 0}
    # queries: [G, n_q] boxes and entity-phrase indices; empty slots get a dummy valid box and are masked
    n_g = len(rows)
    sub_b = torch.full((n_g, n_q, 4), 0.5, dtype=dtype, device=dev)
    obj_b = sub_b.clone()
    sub_l = torch.zeros(n_g, n_q, dtype=torch.long, device=dev)
    obj_l = sub_l.clone()
    valid = torch.zeros(n_g, n_q, dtype=torch.bool, device=dev)
    for r, (k, g) in enumerate(rows):
        im = images[k]
        pairs = np.asarray(im.groups[g], dtype=np.int64)
        label_idx = torch.tensor([ents[k].index(lb) for lb in im.labels], dtype=torch.long, device=dev)
        s = torch.as_tensor(pairs[:, 0], device=dev)
        o = torch.as_tensor(pairs[:, 1], device=dev)
        p = len(pairs)
        boxes = im.boxes.to(dev, dtype)
        sub_b[r, :p], obj_b[r, :p] = boxes[s], boxes[o]
        sub_l[r, :p], obj_l[r, :p] = label_idx[s], label_idx[o]
        valid[r, :p] = True
    out = model.decode(state, img_index, sub_b, obj_b, sub_l, obj_l, valid)
    # softmax over the image's valid entity phrases (padded phrases have -inf logits), top-1 probability
    p_sub = out.sub_logits.float().softmax(-1).amax(-1)
    p_obj = out.obj_logits.float().softmax(-1).amax(-1)
    p_rel = out.rel_logits.float().sigmoid()
    result: list[list[GroupScores]] = [[] for _ in images]
    for r, (k, g) in enumerate(rows):
        p = len(images[k].groups[g])
        n_t = len(images[k].rel_texts)
        result[k].append(GroupScores(p_sub[r, :p].cpu(), p_obj[r, :p].cpu(), p_rel[r, :p, :n_t].cpu()))
    return result, {"encoder_passes": n_enc, "decoder_groups": n_g}
