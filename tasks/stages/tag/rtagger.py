"""Tag stage with the R-Tagger (RLIPv2 Sec. 4.2.2): pure function over records; the model is loaded once per process."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from models.devices import torch_dtype
from models.rlipv2.boxes import xywh_pixels_to_cxcywh
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.preprocess import preprocess_image
from models.rlipv2.tagger import GROUPS_PER_FORWARD, tag_image
from models.rlipv2.vocab import class_keys, key_for_category
from storage.records import Candidate, ImageRecord, TaggedRelation
from tasks.config import TagConfig
from tasks.stages.match import group_candidates, reference_slot_groups
from tasks.stages.tag.common import rank_within_pairs, tagged
from tasks.stats import Count, Ratio, Seconds, Stats

RTAGGER = "rtagger"


_RUNNERS: dict[tuple, RTaggerRunner] = {}
_LOCK = threading.Lock()


class RTaggerRunner:
    """A loaded R-Tagger model; one instance per (checkpoint, config hash, device, dtype) per process."""

    def __init__(self, model: RLIPv2ParSeD, revision: str, device: str = "cpu", dtype: str = "float32"):
        self.model = model.to(device=device, dtype=torch_dtype(dtype, "R-Tagger")).eval()
        self.revision = revision
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_config(cls, cfg: TagConfig) -> RTaggerRunner:
        """Load cfg.checkpoint (safetensors + rlipv2_config.json + tokenizer/) once per process and cache it."""
        if cfg.checkpoint is None:
            raise ValueError(
                "TagConfig.checkpoint is None: the R-Tagger needs trained weights (a directory written by "
                "models.rlipv2.checkpoint.save_checkpoint, e.g. by `python -m models.rlipv2.train`); random "
                "initialisation would produce meaningless confidences"
            )
        from models.rlipv2.checkpoint import (
            CONFIG_NAME,
            checkpoint_revision,
            load_checkpoint,
            require_tagger_checkpoint,
        )
        from models.rlipv2.config import RLIPv2Config

        path = Path(cfg.checkpoint)
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"TagConfig.checkpoint {cfg.checkpoint!r} has no {CONFIG_NAME}")
        require_tagger_checkpoint(path)

        config_hash = RLIPv2Config.from_dict(json.loads((path / CONFIG_NAME).read_text())).hash()
        key = (str(path.resolve()), config_hash, cfg.device, cfg.dtype)
        with _LOCK:
            if key not in _RUNNERS:
                model = load_checkpoint(path, device=cfg.device, dtype=torch_dtype(cfg.dtype, "R-Tagger"))
                _RUNNERS[key] = cls(model, "ckpt:" + checkpoint_revision(path), cfg.device, cfg.dtype)
            return _RUNNERS[key]


def _class_keys(vocabulary: str | None, images: list[ImageRecord]) -> tuple[list[str] | None, dict]:
    """Class keys the heads score and each box's key: the vocabulary's (reference semantics), or, without a
    vocabulary, the model's own names plus the boxes' labels (reltag-trained checkpoints)."""
    if vocabulary is None:
        return None, {(im.image_id, b.ann_id): b.label for im in images for b in im.boxes}
    keys = class_keys(vocabulary)
    out = {}
    for im in images:
        for b in im.boxes:
            try:
                out[(im.image_id, b.ann_id)] = key_for_category(vocabulary, b.category_id)
            except ValueError as e:
                raise ValueError(f"image {im.image_id} ({im.file_name}) box {b.ann_id}: {e}") from None
    return keys, out


def tag_batch_rtagger(
    images: list[ImageRecord],
    pixels: list[Image.Image],
    candidates: list[Candidate],
    runner: RTaggerRunner,
    cfg: TagConfig,
    vocabulary: str | None = None,
) -> tuple[list[TaggedRelation], Stats]:
    """Score the candidates (pair, relation text) of a batch of images with the R-Tagger.

    One encoder pass per image and text list (models.rlipv2.tagger.tag_image), so an image's scores do not
    depend on the other images of the batch. vocabulary ("o365" / "coco"): the subject/object heads score
    that dataset's class keys plus "no objects" and each box enters with its category's key, as the reference
    does; None: the model's own names plus the boxes' labels.

    cfg.grouping "pairs" (reltag): each pair once, N_Q pairs per group, all the image's relation texts
    (sorted) in one forward; rows per cfg.texts: "matched" = the texts matched to that pair (caption provenance
    kept), "all" = every relation text of the image. cfg.grouping "reference": the reference tagger's groups
    of N_Q (pair, text) slots, a pair repeated once per text (tasks.stages.match.reference_slot_groups), up to 16
    groups per forward sharing their merged texts in first-seen order; every slot is scored against the
    forward's texts, rows are its own text ("matched") or every merged text ("all"), and a (pair, text) scored
    in several slots keeps its highest confidence, as the reference's deduplication does.
    Output per row: p_subject and p_object (top-1 softmax over the class keys + "no objects"), p_relation
    (sigmoid), confidence = their product (paper Sec. 4.2.2; threshold.rule relation_only uses p_relation).
    A CUDA out-of-memory error halves the decoder groups per forward and retries (stats["oom_halvings"]).
    """
    t0 = time.perf_counter()
    if len(images) != len(pixels):
        raise ValueError(f"tag_batch_rtagger: {len(images)} image records but {len(pixels)} decoded images")
    model = runner.model
    by_id = {im.image_id: (im, px) for im, px in zip(images, pixels)}
    by_image: dict[int, list[Candidate]] = defaultdict(list)
    for c in candidates:
        if c.image_id not in by_id:
            raise ValueError(
                f"candidate ({c.subject_ann_id}, {c.object_ann_id}, {c.relation!r}) names image {c.image_id}, not in the batch"
            )
        by_image[c.image_id].append(c)
    keys, box_key = _class_keys(vocabulary, [by_id[i][0] for i in by_image])
    rows: list[TaggedRelation] = []
    enc_passes = dec_groups = n_slots = 0
    oom = {"groups_per_forward": GROUPS_PER_FORWARD, "oom_halvings": 0}
    hits0, miss0 = model.phrase_cache.hits, model.phrase_cache.misses
    for image_id in sorted(by_image):
        im, px = by_id[image_id]
        cands = by_image[image_id]
        if px.size != (im.width, im.height):
            raise ValueError(
                f"image {image_id} ({im.file_name}): decoded size {px.size} != record size ({im.width}, {im.height})"
            )
        index = {b.ann_id: k for k, b in enumerate(im.boxes)}
        for c in cands:
            for a in (c.subject_ann_id, c.object_ann_id):
                if a not in index:
                    raise ValueError(
                        f"candidate pair ({c.subject_ann_id}, {c.object_ann_id}) of image {image_id} names box {a}, "
                        "which the image does not have"
                    )
        boxes = torch.tensor(
            [xywh_pixels_to_cxcywh(b.x, b.y, b.w, b.h, im.width, im.height) for b in im.boxes],
            dtype=torch.float32,
        )
        labels = [box_key[(image_id, b.ann_id)] for b in im.boxes]
        pixels_t = preprocess_image(px, model.cfg)
        matched: dict[tuple[int, int], dict[str, Candidate]] = defaultdict(dict)
        for c in cands:
            matched[(c.subject_ann_id, c.object_ann_id)][c.relation] = c
        lemmas = {c.relation: c.relation_lemma for c in cands}
        # forwards: (slots, texts, group sizes, own text per slot or None)
        forwards = []
        if cfg.grouping == "pairs":
            groups = group_candidates(cands, cfg.n_q)
            texts = sorted({t for g in groups for t in g.texts})
            slots = [p for g in groups for p in g.pairs]
            forwards.append((slots, texts, [len(g.pairs) for g in groups], None))
        else:
            groups = reference_slot_groups(cands, cfg.n_q)
            for start in range(0, len(groups), GROUPS_PER_FORWARD):
                chunk = groups[start : start + GROUPS_PER_FORWARD]
                texts = list(dict.fromkeys(t for g in chunk for t in g.texts))
                slots = [s for g in chunk for s in g.slots]
                own = [g.texts[i] for g in chunk for i in g.slot_text]
                forwards.append((slots, texts, [len(g.slots) for g in chunk], own))
        best: dict[tuple[int, int, str], TaggedRelation] = {}
        for slots, texts, sizes, own in forwards:
            scores, counters = _tag_image_halving(
                oom, model, pixels_t, boxes, labels, [(index[s], index[o]) for s, o in slots], texts,
                n_q=cfg.n_q, class_keys=keys, group_sizes=sizes,
            )  # fmt: skip
            enc_passes += counters["encoder_passes"]
            dec_groups += counters["decoder_groups"]
            n_slots += len(slots)
            col = {t: i for i, t in enumerate(texts)}
            for k, (s, o) in enumerate(slots):
                m = matched[(s, o)]
                if cfg.texts == "all":
                    wanted = texts
                elif own is None:
                    wanted = sorted(m)
                else:
                    wanted = [own[k]]
                ps, po = float(scores.p_subject[k]), float(scores.p_object[k])
                for text in wanted:
                    row = _row(
                        image_id, s, o, text, m, lemmas, ps, po, float(scores.p_relation[k, col[text]])
                    )
                    key = (s, o, text)
                    if key not in best or row.confidence > best[key].confidence:
                        best[key] = row
        rows.extend(best.values())
    rank_within_pairs(rows)
    n_img = len(by_image)
    return rows, Stats(
        pairs=Count(len({(c.image_id, c.subject_ann_id, c.object_ann_id) for c in candidates})),
        slots=Count(n_slots),
        groups=Count(dec_groups),
        images=Count(n_img),  # images with at least one candidate (the others need no forward)
        images_in_batch=Count(len(images)),
        forwards=Count(dec_groups),  # decoder groups of N_Q slots; encoder passes are counted apart
        forwards_per_image=Ratio(dec_groups, n_img),
        pairs_per_forward=Ratio(n_slots, dec_groups),
        encoder_passes=Count(enc_passes),
        phrase_cache_hits=Count(model.phrase_cache.hits - hits0),
        phrase_cache_misses=Count(model.phrase_cache.misses - miss0),
        oom_halvings=Count(
            oom["oom_halvings"]
        ),  # CUDA out-of-memory errors met by halving groups per forward
        seconds=Seconds.of(time.perf_counter() - t0),
    )


def _tag_image_halving(state: dict, *args, **kwargs):
    """tag_image with state["groups_per_forward"] decoder groups per forward; a CUDA out-of-memory error halves
    it (for this and the batch's later forwards) and retries, counted in state["oom_halvings"]. At one group
    per forward the error is raised: the unit fails like any other and the flow redoes it later."""
    while True:
        try:
            return tag_image(*args, groups_per_forward=state["groups_per_forward"], **kwargs)
        except torch.OutOfMemoryError:
            if state["groups_per_forward"] == 1:
                raise
            state["groups_per_forward"] = max(1, state["groups_per_forward"] // 2)
            state["oom_halvings"] += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _row(image_id, s, o, text, matched, lemmas, ps, po, pr) -> TaggedRelation:
    """One output row. A text matched to this pair keeps its caption provenance; a text of another pair of the
    image (texts "all", or a reference forward's merged text) takes this pair's labels and no captions."""
    c = matched.get(text) or next(iter(matched.values()))
    return tagged(c, ps, po, pr, RTAGGER, relation=text, relation_lemma=lemmas[text])
