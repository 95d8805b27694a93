"""R-Tagger inference (RLIPv2 Sec. 4.2.2): score annotated subject-object pairs against relation texts.

`load_tagger(DIR).score(image, boxes, labels, pairs, texts, vocabulary=...)` is the scoring API for notebooks and checks;
`tag_image` is what the tag stage calls. Both follow the reference tagger's semantics:
- one image per encoder pass (the reference runs batch size 1), so an image's scores never depend on the
  other images of a batch; the encoder runs once per (image, text list) and every group decodes from it;
- pairs fill slots in the given order, N_Q = 100 per group (a pair may repeat, as the reference repeats a
  pair once per text); groups never interact;
- every slot is scored against every text in `texts`, in that order (the forward's merged text list): the
  texts are fused with the image, so the list itself is part of the input;
- p_subject / p_object: top-1 of the softmax over the class keys plus "no objects"; p_relation: sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.rlipv2.boxes import xywh_pixels_to_cxcywh
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.preprocess import preprocess_image

GROUPS_PER_FORWARD = 16  # the reference's --img_inference_batch: groups decoded together (memory bound only)


@dataclass(slots=True)
class Scores:
    """p_subject float32[P], p_object float32[P], p_relation float32[P, T] (numpy)."""

    p_subject: np.ndarray
    p_object: np.ndarray
    p_relation: np.ndarray


def entity_texts(
    model: RLIPv2ParSeD, labels: list[str] | None = None, class_keys: list[str] | None = None
) -> list[str]:
    """The entity texts scored by the subject/object heads: the class keys in order (`class_keys`, else the
    model's), then any label of the image that is not among them (reltag extension for checkpoints without a
    vocabulary), then "no objects"."""
    names = list(model.cfg.entity_names if class_keys is None else class_keys)
    known = set(names)
    for lb in labels or []:
        if lb not in known:
            names.append(lb)
            known.add(lb)
    if model.cfg.no_object_text in known:
        raise ValueError(f"class key {model.cfg.no_object_text!r} collides with the 'no objects' text")
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
def tag_image(
    model: RLIPv2ParSeD,
    pixels: torch.Tensor,
    boxes: torch.Tensor,
    labels: list[str],
    slots: list[tuple[int, int]],
    texts: list[str],
    n_q: int | None = None,
    groups_per_forward: int = GROUPS_PER_FORWARD,
    reference_style: bool = False,
    class_keys: list[str] | None = None,
    group_sizes: list[int] | None = None,
) -> tuple[Scores, dict]:
    """Score `slots` of one image against `texts`.

    Args:
        pixels: Tensor[3, H, W] normalised (preprocess_image); boxes: Tensor[n, 4] (cx, cy, w, h) in [0, 1];
        labels: class key per box; slots: (subject, object) box indices, in slot order (repeats allowed);
        texts: relation texts; n_q: slots per group (default the model's N_Q).
        class_keys: the entity texts' class keys (default the model's `entity_names`).
        group_sizes: slots per group in order (each <= n_q, summing to len(slots)); default: cut every n_q.
        reference_style: benchmark baseline with the reference's cost model: the image is re-encoded for
            every group (the reference repeats it once per group in the batch) and phrases are re-encoded
            every forward; the scores are the same.
    Returns: Scores, and counters (encoder_passes, decoder_groups).
    """
    model.eval()
    n_q = n_q or model.cfg.n_q
    if not 0 < n_q <= model.cfg.n_q:
        raise ValueError(f"tag_image: n_q {n_q} must be in 1..{model.cfg.n_q} (the model's pair slots)")
    n_box = boxes.shape[0]
    if len(labels) != n_box:
        raise ValueError(f"tag_image: {n_box} boxes but {len(labels)} labels")
    for k, (s, o) in enumerate(slots):
        if not (0 <= s < n_box and 0 <= o < n_box):
            raise ValueError(f"tag_image: pair {k} ({s}, {o}) names a box outside 0..{n_box - 1}")
    p = len(slots)
    if p == 0:
        z = np.zeros(0, np.float32)
        return Scores(z, z.copy(), np.zeros((0, len(texts)), np.float32)), {
            "encoder_passes": 0,
            "decoder_groups": 0,
        }
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ents = entity_texts(model, labels, class_keys)
    label_idx = torch.tensor([ents.index(lb) for lb in labels], dtype=torch.long, device=dev)
    px = pixels.to(dev, dtype)[None]
    pmask = torch.zeros(1, px.shape[2], px.shape[3], dtype=torch.bool, device=dev)
    cache = False if reference_style else None
    state = (
        None if reference_style else model.encode(px, pmask, [ents], [list(texts)], use_phrase_cache=cache)
    )
    n_enc = 0 if reference_style else 1
    pairs = torch.as_tensor(np.asarray(slots, dtype=np.int64).reshape(-1, 2), device=dev)
    bx = boxes.to(dev, dtype)
    p_sub, p_obj, p_rel = [], [], []
    if group_sizes is None:
        groups = [pairs[i : i + n_q] for i in range(0, p, n_q)]
    else:
        if sum(group_sizes) != p or not all(0 < k <= n_q for k in group_sizes):
            raise ValueError(
                f"tag_image: group sizes {group_sizes} must be 1..{n_q} each and sum to {p} slots"
            )
        bounds = np.cumsum([0, *group_sizes])
        groups = [pairs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    for start in range(0, len(groups), groups_per_forward):
        chunk = groups[start : start + groups_per_forward]
        g = len(chunk)
        if reference_style:
            # the reference's batch: the image repeated once per group, texts re-encoded
            st = model.encode(px.expand(g, -1, -1, -1), pmask.expand(g, -1, -1), [ents] * g, [list(texts)] * g,
                              use_phrase_cache=False)  # fmt: skip
            img_index = torch.arange(g, device=dev)
            n_enc += g
        else:
            st = state
            img_index = torch.zeros(g, dtype=torch.long, device=dev)
        sub_b = torch.full((g, n_q, 4), 0.5, dtype=dtype, device=dev)
        obj_b = sub_b.clone()
        sub_l = torch.zeros(g, n_q, dtype=torch.long, device=dev)
        obj_l = sub_l.clone()
        valid = torch.zeros(g, n_q, dtype=torch.bool, device=dev)
        for r, grp in enumerate(chunk):
            k = grp.shape[0]
            sub_b[r, :k], obj_b[r, :k] = bx[grp[:, 0]], bx[grp[:, 1]]
            sub_l[r, :k], obj_l[r, :k] = label_idx[grp[:, 0]], label_idx[grp[:, 1]]
            valid[r, :k] = True
        out = model.decode(st, img_index, sub_b, obj_b, sub_l, obj_l, valid)
        ps = out.sub_logits.float().softmax(-1).amax(-1)
        po = out.obj_logits.float().softmax(-1).amax(-1)
        pr = out.rel_logits.float().sigmoid()
        for r, grp in enumerate(chunk):
            k = grp.shape[0]
            p_sub.append(ps[r, :k])
            p_obj.append(po[r, :k])
            p_rel.append(pr[r, :k, : len(texts)])
    scores = Scores(
        torch.cat(p_sub).cpu().numpy().astype(np.float32),
        torch.cat(p_obj).cpu().numpy().astype(np.float32),
        torch.cat(p_rel).cpu().numpy().astype(np.float32).reshape(p, len(texts)),
    )
    return scores, {"encoder_passes": n_enc, "decoder_groups": len(groups)}


class Tagger:
    """A loaded R-Tagger with the scoring API. Build with load_tagger(DIR)."""

    def __init__(self, model: RLIPv2ParSeD, revision: str):
        self.model = model.eval()
        self.revision = revision

    @property
    def class_keys(self) -> list[str]:
        return list(self.model.cfg.entity_names)

    @property
    def vocabulary(self) -> str:
        """What the checkpoint's own class keys are, in words: 'o365' / 'coco' (the keys of that vocabulary, as
        `python -m models.rlipv2.convert --vocabulary` writes them), 'none' (no keys: reltag-trained or converted
        with --vocabulary none), or 'custom (N class keys)'."""
        from models.rlipv2.vocab import class_keys

        keys = self.class_keys
        if not keys:
            return "none"
        for name in ("o365", "coco"):
            if keys == class_keys(name):
                return name
        return f"custom ({len(keys)} class keys)"

    def _entity_keys(self, labels: list[str], vocabulary) -> list[str] | None:
        """The class keys the subject/object heads score for `vocabulary` (None: the labels themselves, for a
        checkpoint without keys); every label must be one of them."""
        from models.rlipv2.vocab import class_keys

        if vocabulary is None:
            if self.class_keys:
                raise ValueError(
                    f"score: vocabulary=None scores the image's own labels, but this checkpoint has the "
                    f"{self.vocabulary} vocabulary; pass vocabulary='o365' / 'coco' (the dataset's) or the class keys"
                )
            return None
        if isinstance(vocabulary, str):
            # an unknown name is class_keys' ValueError, naming the choices
            keys, name = class_keys(vocabulary), f"the {vocabulary} vocabulary"
        else:
            keys, name = [str(k) for k in vocabulary], f"the {len(vocabulary)} class keys given"
        known = set(keys)
        unknown = sorted({lb for lb in labels if lb not in known})
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(
                f"score: labels {unknown[:5]}{more} are not class keys of {name} (the checkpoint's vocabulary: "
                f"{self.vocabulary}); give each box its class key in the dataset's vocabulary"
            )
        return keys

    def score(self, image, boxes, labels, pairs, texts, n_q: int | None = None, *, vocabulary) -> Scores:
        """Score pairs of one image against relation texts.

        Args:
            image: PIL image (converted to RGB); boxes: [[x, y, w, h]] in pixels; labels: class key per box;
            pairs: [(subject_idx, object_idx)] in slot order; texts: relation texts.
            vocabulary: the class keys the subject/object heads score (the entity texts), always given: "o365"
                or "coco" (that dataset's keys in the reference's order, as the tag stage uses), a list of
                class keys (e.g. `tagger.class_keys`), or None for a checkpoint without keys (the labels
                themselves). A label outside it is a ValueError naming the label and the checkpoint's vocabulary:
                a checkpoint converted with `--vocabulary o365` would otherwise score COCO boxes against 365
                entity texts.
        Returns: Scores (numpy float32): p_subject [P], p_object [P], p_relation [P, T].
        """
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"score: image must be a PIL image, got {type(image).__name__}")
        keys = self._entity_keys(list(labels), vocabulary)
        img = image.convert("RGB")
        w, h = img.size
        rows = []
        for k, b in enumerate(boxes):
            if len(b) != 4 or not all(np.isfinite(b)) or b[2] <= 0 or b[3] <= 0:
                raise ValueError(f"score: box {k} {list(b)} must be [x, y, w, h] with w, h > 0")
            # clamped to the image as the reference's CocoDetection does; empty after clamping is an error
            x0, y0 = min(max(float(b[0]), 0.0), w), min(max(float(b[1]), 0.0), h)
            x1, y1 = min(max(float(b[0] + b[2]), 0.0), w), min(max(float(b[1] + b[3]), 0.0), h)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"score: box {k} {list(b)} lies outside the {w}x{h} image")
            rows.append(xywh_pixels_to_cxcywh(x0, y0, x1 - x0, y1 - y0, w, h))
        bx = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
        px = preprocess_image(img, self.model.cfg)
        scores, _ = tag_image(self.model, px, bx, list(labels), [tuple(p) for p in pairs], list(texts), n_q,
                              class_keys=keys)  # fmt: skip
        return scores


def load_tagger(ckpt_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Tagger:
    """Load a reltag checkpoint directory (converted from the reference, or trained by reltag)."""
    from models.rlipv2.checkpoint import checkpoint_revision, load_checkpoint, require_tagger_checkpoint

    require_tagger_checkpoint(ckpt_dir)
    model = load_checkpoint(ckpt_dir, device=device, dtype=dtype)
    return Tagger(model, checkpoint_revision(ckpt_dir))
