"""Tag stage with the R-Tagger (RLIPv2 Sec. 4.2.2): pure function over records; the model is loaded once per process."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from models.rlipv2.boxes import xywh_pixels_to_cxcywh
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.preprocess import preprocess_image
from models.rlipv2.tagger import TagImage, tag_images
from storage.records import Candidate, ImageRecord, TaggedRelation
from tasks.config import TagConfig
from tasks.match import group_candidates
from tasks.tag import rank_within_pairs

RTAGGER = "rtagger"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_RUNNERS: dict[tuple, RTaggerRunner] = {}
_LOCK = threading.Lock()


class RTaggerRunner:
    """A loaded R-Tagger model; one instance per (checkpoint, config hash, device, dtype) per process."""

    def __init__(self, model: RLIPv2ParSeD, revision: str, device: str = "cpu", dtype: str = "float32"):
        if dtype not in _DTYPES:
            raise ValueError(f"RTaggerRunner: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        self.model = model.to(device=device, dtype=_DTYPES[dtype]).eval()
        self.revision = revision
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_model(cls, model: RLIPv2ParSeD, device: str = "cpu", dtype: str = "float32") -> RTaggerRunner:
        """Wrap an in-memory model (tests, benchmarks); the revision hashes its config and weights."""
        from models.rlipv2.checkpoint import state_revision

        return cls(model, "state:" + state_revision(model), device, dtype)

    @classmethod
    def from_config(cls, cfg: TagConfig) -> RTaggerRunner:
        """Load cfg.checkpoint (safetensors + rlipv2_config.json + tokenizer/) once per process and cache it."""
        if cfg.checkpoint is None:
            raise ValueError(
                "TagConfig.checkpoint is None: the R-Tagger needs trained weights (a directory written by "
                "models.rlipv2.checkpoint.save_checkpoint, e.g. by `python -m models.rlipv2.train`); random "
                "initialisation would produce meaningless confidences"
            )
        from models.rlipv2.checkpoint import CONFIG_NAME, checkpoint_revision, load_checkpoint
        from models.rlipv2.config import RLIPv2Config

        path = Path(cfg.checkpoint)
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"TagConfig.checkpoint {cfg.checkpoint!r} has no {CONFIG_NAME}")

        config_hash = RLIPv2Config.from_dict(json.loads((path / CONFIG_NAME).read_text())).hash()
        key = (str(path.resolve()), config_hash, cfg.device, cfg.dtype)
        with _LOCK:
            if key not in _RUNNERS:
                model = load_checkpoint(path, device=cfg.device, dtype=_DTYPES[cfg.dtype])
                _RUNNERS[key] = cls(model, "ckpt:" + checkpoint_revision(path), cfg.device, cfg.dtype)
            return _RUNNERS[key]


def tag_batch_rtagger(
    images: list[ImageRecord],
    pixels: list[Image.Image],
    candidates: list[Candidate],
    runner: RTaggerRunner,
    cfg: TagConfig,
) -> tuple[list[TaggedRelation], dict]:
    """Score every candidate (pair, relation text) of a batch of images with the R-Tagger.

    Pairs are grouped by at most cfg.n_q per forward; the groups of one image share one backbone+encoder
    pass, and cfg.batch_size images share one encoder batch. Output per (pair, text): p_subject and p_object
    (top-1 softmax of the subject/object class), p_relation (sigmoid), confidence = their product (paper
    Sec. 4.2.2) and relation_rank within the pair.

    Which texts a pair is scored against (cfg.texts): "matched" (default) emits one row per candidate, i.e.
    the texts matched to that pair from the captions, because only those carry caption provenance and the
    row count stays that of the candidates; "all" emits a row for every relation text of the image's
    candidates (the reference code's behaviour), with caption_ids [] where the text was not matched to the
    pair. The model sees all the image's relation texts in both modes (they share the fusion pass), so a
    matched row has the same scores in both modes.
    """
    t0 = time.perf_counter()
    if len(images) != len(pixels):
        raise ValueError(f"tag_batch_rtagger: {len(images)} image records but {len(pixels)} decoded images")
    model = runner.model
    by_id = {im.image_id: (im, px) for im, px in zip(images, pixels)}
    for c in candidates:
        if c.image_id not in by_id:
            raise ValueError(
                f"candidate ({c.subject_ann_id}, {c.object_ann_id}, {c.relation!r}) names image {c.image_id}, not in the batch"
            )
    groups = group_candidates(candidates, cfg.n_q)
    per_image: dict[int, list] = defaultdict(list)
    for g in groups:
        per_image[g.image_id].append(g)
    cands_by_key: dict[tuple[int, int, int], dict[str, Candidate]] = defaultdict(dict)
    lemmas: dict[tuple[int, str], str] = {}
    for c in candidates:
        cands_by_key[(c.image_id, c.subject_ann_id, c.object_ann_id)][c.relation] = c
        lemmas.setdefault((c.image_id, c.relation), c.relation_lemma)

    work = []  # (ImageRecord, TagImage, groups, rel_texts, box index)
    for image_id in sorted(per_image):
        im, px = by_id[image_id]
        if px.size != (im.width, im.height):
            raise ValueError(
                f"image {image_id} ({im.file_name}): decoded size {px.size} != record size ({im.width}, {im.height})"
            )
        index = {b.ann_id: k for k, b in enumerate(im.boxes)}
        rel_texts = sorted({t for g in per_image[image_id] for t in g.texts})
        tag_groups = []
        for g in per_image[image_id]:
            for s, o in g.pairs:
                for a in (s, o):
                    if a not in index:
                        raise ValueError(
                            f"candidate pair ({s}, {o}) of image {image_id} names box {a}, which the image does not have"
                        )
            tag_groups.append([(index[s], index[o]) for s, o in g.pairs])
        boxes = torch.tensor(
            [xywh_pixels_to_cxcywh(b.x, b.y, b.w, b.h, im.width, im.height) for b in im.boxes],
            dtype=torch.float32,
        )
        tim = TagImage(
            preprocess_image(px, model.cfg), boxes, [b.label for b in im.boxes], tag_groups, rel_texts
        )
        work.append((im, tim, per_image[image_id], rel_texts))

    rows: list[TaggedRelation] = []
    enc_passes = dec_groups = 0
    hits0, miss0 = model.phrases.cache_hits, model.phrases.cache_misses
    for start in range(0, len(work), cfg.batch_size):
        chunk = work[start : start + cfg.batch_size]
        scores, counters = tag_images(model, [w[1] for w in chunk], cfg.n_q)
        enc_passes += counters["encoder_passes"]
        dec_groups += counters["decoder_groups"]
        for (im, _tim, grps, rel_texts), img_scores in zip(chunk, scores):
            col = {t: i for i, t in enumerate(rel_texts)}
            for g, gs in zip(grps, img_scores):
                for p, (s, o) in enumerate(g.pairs):
                    matched = cands_by_key[(im.image_id, s, o)]
                    texts = [g.texts[i] for i in g.pair_texts[p]] if cfg.texts == "matched" else rel_texts
                    ps, po = float(gs.p_subject[p]), float(gs.p_object[p])
                    for text in texts:
                        pr = float(gs.p_relation[p, col[text]])
                        rows.append(_row(im.image_id, s, o, text, matched, lemmas, ps, po, pr))
    rank_within_pairs(rows)
    n_pairs = sum(len(g.pairs) for g in groups)
    n_img = len(work)
    # keys follow tasks.pipeline.merge_stats: counts are summed across batches, the two ratios recomputed
    return rows, {
        "tag_rows": len(rows),
        "pairs": n_pairs,
        "groups": len(groups),
        "images": n_img,  # images with at least one candidate (the others need no forward)
        "images_in_batch": len(images),
        "forwards": dec_groups,  # decoder forwards of N_Q slots; encoder passes are counted apart
        "forwards_per_image": round(dec_groups / n_img, 4) if n_img else 0.0,
        "pairs_per_forward": round(n_pairs / dec_groups, 4) if dec_groups else 0.0,
        "encoder_passes": enc_passes,
        "phrase_cache_hits": model.phrases.cache_hits - hits0,
        "phrase_cache_misses": model.phrases.cache_misses - miss0,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _row(image_id, s, o, text, matched, lemmas, ps, po, pr) -> TaggedRelation:
    """One output row; confidence = p_subject * p_object * p_relation (paper Sec. 4.2.2)."""
    c = matched.get(text)
    if (
        c is None
    ):  # texts="all": the text came from another pair of the image; labels from this pair's candidate
        ref = next(iter(matched.values()))
        return TaggedRelation(
            image_id, s, o, ref.subject_category_id, ref.object_category_id, ref.subject_label, ref.object_label,
            text, lemmas[(image_id, text)], [], 0, ps, po, pr, ps * po * pr, 0, RTAGGER,
        )  # fmt: skip
    return TaggedRelation(
        image_id, s, o, c.subject_category_id, c.object_category_id, c.subject_label, c.object_label,
        c.relation, c.relation_lemma, list(c.caption_ids), c.n_captions, ps, po, pr, ps * po * pr, 0, RTAGGER,
    )  # fmt: skip
