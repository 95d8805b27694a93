"""Tag stage with the CLIP tagger (paper Table 5 baseline): pure function over records; CLIP loaded once per process."""

from __future__ import annotations

import threading
import time

from PIL import Image

from models.clip_tagger import ClipQuery, ClipRelationScorer
from storage.records import Candidate, ImageRecord, TaggedRelation
from tasks.config import TagConfig
from tasks.stages.tag.common import CLIP, rank_within_pairs, tagged
from tasks.stats import Count, Seconds, Stats

_SCORERS: dict[tuple, ClipRelationScorer] = {}
_LOCK = threading.Lock()


def load_scorer(cfg: TagConfig) -> ClipRelationScorer:
    """cfg.clip_model at cfg.clip_revision on cfg.device in cfg.dtype, loaded once per process."""
    key = (cfg.clip_model, cfg.clip_revision, cfg.device, cfg.dtype)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = ClipRelationScorer.load(
                cfg.clip_model, cfg.clip_revision, device=cfg.device, dtype=cfg.dtype
            )
        return _SCORERS[key]


def tag_batch_clip(
    images: list[ImageRecord],
    pixels: list[Image.Image],
    candidates: list[Candidate],
    scorer: ClipRelationScorer,
    cfg: TagConfig,
) -> tuple[list[TaggedRelation], Stats]:
    """Score every candidate (pair, relation text) with CLIP on the pair's union crop (models/clip_tagger.py).

    One row per candidate: p_relation = softmax over ["a photo of {subject} {relation} {object}", "a photo of
    {subject} having no relation with {object}"] of 100 x cosine, with the boxes' class names as subject and
    object; p_subject = p_object = 1.0 (CLIP does not score the ground-truth classes), so confidence =
    p_relation under either threshold rule. A pair whose union crop is empty (a box that rounds to no pixel)
    gets NaN, which the threshold stage rejects as nan_confidence (the reference skips such pairs). The cut
    itself is the threshold stage's: rows of this tagger are held to threshold.clip_eta (0.8, the reference's),
    not threshold.eta.
    """
    t0 = time.perf_counter()
    if len(images) != len(pixels):
        raise ValueError(f"tag_batch_clip: {len(images)} image records but {len(pixels)} decoded images")
    by_id = {im.image_id: (im, px) for im, px in zip(images, pixels)}
    per_image: dict[int, list[Candidate]] = {}
    for c in candidates:
        if c.image_id not in by_id:
            raise ValueError(
                f"candidate ({c.subject_ann_id}, {c.object_ann_id}, {c.relation!r}) names image {c.image_id}, "
                "not in the batch"
            )
        per_image.setdefault(c.image_id, []).append(c)
    order = sorted(per_image)
    queries: list[list[ClipQuery]] = []
    for image_id in order:
        im, px = by_id[image_id]
        if px.size != (im.width, im.height):
            raise ValueError(
                f"image {image_id} ({im.file_name}): decoded size {px.size} != record size ({im.width}, {im.height})"
            )
        boxes = {b.ann_id: (b.x, b.y, b.w, b.h) for b in im.boxes}
        qs = []
        for c in per_image[image_id]:
            for a in (c.subject_ann_id, c.object_ann_id):
                if a not in boxes:
                    raise ValueError(
                        f"candidate pair ({c.subject_ann_id}, {c.object_ann_id}) of image {image_id} names box "
                        f"{a}, which the image does not have"
                    )
            qs.append(
                ClipQuery(
                    boxes[c.subject_ann_id],
                    boxes[c.object_ann_id],
                    c.subject_label,
                    c.relation,
                    c.object_label,
                )
            )
        queries.append(qs)
    scores, sstats = scorer.score([by_id[i][1] for i in order], queries)
    rows = []
    for image_id, ps in zip(order, scores):
        for c, p in zip(per_image[image_id], ps):
            rows.append(tagged(c, 1.0, 1.0, p, CLIP))  # ground-truth boxes: p_subject = p_object = 1
    rank_within_pairs(rows)
    return rows, Stats(
        pairs=Count(len({(r.image_id, r.subject_ann_id, r.object_ann_id) for r in rows})),
        images=Count(len(order)),  # images with at least one candidate (the others need no forward)
        images_in_batch=Count(len(images)),
        clip_crops=Count(sstats["crops"]),
        clip_unscored=Count(sstats["unscored"]),
        clip_texts=Count(sstats["texts"]),
        forwards=Count(sstats["forwards"]),  # image forwards of up to CROPS_PER_FORWARD union crops
        seconds=Seconds.of(time.perf_counter() - t0),
    )
