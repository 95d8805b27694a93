"""Running one stage over one batch: read its inputs, call the stage's pure function, write, then record.

The order inside `run_batch_stage` is the durability contract (DESIGN.md): every output file is written
under a temporary name, closed and renamed; only then is the unit recorded in the ledger. A unit with a
ledger record is never run again; a unit without one is (re)done from its inputs.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow.parquet as pq

from storage import schemas
from storage.atomic import write_json, write_table
from storage.layout import STAGE_DIRS, RunLayout
from storage.ledger import Ledger, Unit
from storage.records import (
    Candidate,
    Caption,
    ImageRecord,
    ParsedRelation,
    Quarantined,
    TaggedRelation,
    Triplet,
)
from tasks.config import PipelineConfig

_OUT_TYPES = {
    "caption": Caption,
    "parse": ParsedRelation,
    "match": Candidate,
    "tag": TaggedRelation,
    "threshold": Triplet,
}


@dataclass(frozen=True)
class RunContext:
    """What every unit of a run needs to know; small and picklable (it crosses into Prefect tasks)."""

    root: str
    dataset: str
    run_key: str
    images_root: str
    captions_file: str | None
    config_json: str  # PipelineConfig as JSON, so the context stays hashable and picklable

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root, self.dataset, self.run_key)

    @functools.cached_property
    def config(self) -> PipelineConfig:
        return PipelineConfig.model_validate_json(self.config_json)


# -- per-process resources: models are loaded once per worker process, not per batch ------------------------


@functools.lru_cache(maxsize=4)
def _captioners(config_json: str, captions_file: str | None):
    from tasks.caption import build_captioners

    return build_captioners(PipelineConfig.model_validate_json(config_json).caption, captions_file)


@functools.lru_cache(maxsize=4)
def _vocabulary(categories_json: str, vocabulary: str):
    from models.matcher import Vocabulary

    return Vocabulary.from_categories(json.loads(categories_json), vocabulary)


@functools.lru_cache(maxsize=2)
def _rtagger(config_json: str):
    from tasks.rtagger import RTaggerRunner

    return RTaggerRunner.from_config(PipelineConfig.model_validate_json(config_json).tag)


@functools.lru_cache(maxsize=8)
def _manifest(ctx: RunContext) -> dict:
    from storage.atomic import read_json

    return read_json(ctx.layout.fs, ctx.layout.manifest)


@functools.lru_cache(maxsize=4)
def _shard_images(ctx: RunContext, shard: int) -> tuple[ImageRecord, ...]:
    from tasks.plan import shard_records

    return tuple(shard_records(ctx.layout, shard))


def batch_images(ctx: RunContext, shard: int, batch: int) -> list[ImageRecord]:
    bs = ctx.config.plan.batch_size
    return list(_shard_images(ctx, shard)[batch * bs : (batch + 1) * bs])


def _read(ctx: RunContext, stage: str, shard: int, batch: int) -> list:
    layout = ctx.layout
    with layout.fs.open(layout.stage_batch(stage, shard, batch), "rb") as f:
        return schemas.from_table(pq.read_table(f), _OUT_TYPES[stage])


def _load_pixels(ctx: RunContext, images: list[ImageRecord]):
    from tasks.images import load_image

    pixels, quarantined, kept = [], [], []
    for im in images:
        img, q = load_image(ctx.images_root, im, stage="tag")
        if q is not None:
            quarantined.append(q)
        else:
            kept.append(im)
            pixels.append(img)
    return kept, pixels, quarantined


def compute(
    ctx: RunContext, stage: str, shard: int, batch: int
) -> tuple[list, list[Quarantined], dict, list]:
    """Run one stage's pure function on one batch. Returns (rows, quarantined, stats, rejects)."""
    cfg = ctx.config
    images = batch_images(ctx, shard, batch)
    if stage == "caption":
        from tasks.caption import batch_seed, caption_batch

        out = caption_batch(
            images,
            list(_captioners(ctx.config_json, ctx.captions_file)),
            ctx.images_root,
            batch_seed(ctx.run_key, shard, batch),
            cfg.caption,
        )
        return out.captions, out.quarantine, out.stats, []
    if stage == "parse":
        from tasks.parse import parse_batch

        out = parse_batch(_read(ctx, "caption", shard, batch), cfg.parse)
        return out.relations, [], out.stats, []
    if stage == "match":
        from tasks.match import match_batch

        cats = json.dumps(_manifest(ctx)["categories"], sort_keys=True)
        out = match_batch(
            images, _read(ctx, "parse", shard, batch), cfg.match, _vocabulary(cats, cfg.match.vocabulary)
        )
        return out.candidates, [], out.stats, []
    if stage == "tag":
        candidates = _read(ctx, "match", shard, batch)
        if cfg.tag.tagger == "greedy_overlap":
            from tasks.tag import tag_greedy

            rows, stats = tag_greedy(images, candidates)
            return rows, [], stats, []
        need = {c.image_id for c in candidates}
        kept, pixels, quarantined = _load_pixels(ctx, [im for im in images if im.image_id in need])
        ok = {im.image_id for im in kept}
        if cfg.tag.tagger == "clip":
            from tasks.clip_tag import load_scorer, tag_batch_clip

            rows, stats = tag_batch_clip(
                kept, pixels, [c for c in candidates if c.image_id in ok], load_scorer(cfg.tag), cfg.tag
            )
            return rows, quarantined, stats, []
        from tasks.rtagger import tag_batch_rtagger

        rows, stats = tag_batch_rtagger(
            kept, pixels, [c for c in candidates if c.image_id in ok], _rtagger(ctx.config_json), cfg.tag,
            vocabulary=cfg.match.vocabulary,
        )  # fmt: skip
        return rows, quarantined, stats, []
    if stage == "threshold":
        from tasks.threshold import threshold_batch

        accepted, rejects, stats = threshold_batch(
            images, _read(ctx, "tag", shard, batch), cfg.threshold, ctx.run_key
        )
        return accepted, [], stats, rejects
    raise ValueError(f"unknown stage {stage!r}; stages are {list(STAGE_DIRS)}")


def run_batch_stage(ctx: RunContext, stage: str, shard: int, batch: int) -> dict:
    """Do one unit unless the ledger says it is done; returns the ledger record."""
    layout = ctx.layout
    ledger = Ledger(layout)
    unit = Unit(stage, shard, batch)
    if ledger.is_done(unit):
        return {**ledger.read(unit), "skipped": True}
    t0 = time.perf_counter()
    try:
        rows, quarantined, stats, rejects = compute(ctx, stage, shard, batch)
        fs = layout.fs
        n, nbytes = write_table(
            fs,
            layout.stage_batch(stage, shard, batch),
            schemas.to_table(rows, _OUT_TYPES[stage]),
            schemas.SCHEMAS[_OUT_TYPES[stage]],
        )
        if quarantined:
            write_table(
                fs,
                layout.quarantine(stage, shard, batch),
                schemas.to_table(quarantined, Quarantined),
                schemas.QUARANTINE,
            )
            stats = {**stats, "quarantined": len(quarantined)}
        if stage == "threshold":
            from storage.records import Reject

            write_table(fs, layout.rejects(shard, batch), schemas.to_table(rejects, Reject), schemas.REJECTS)
    except Exception as e:
        ledger.record_failed(unit, f"{type(e).__name__}: {e}")
        raise
    info = {
        "rows": n,
        "bytes": nbytes,
        "seconds": round(time.perf_counter() - t0, 4),
        "items": len(batch_images(ctx, shard, batch)),
        "stats": stats,
    }
    ledger.record_done(unit, info)
    return info


#: derived stats: recomputed from the merged counts instead of being summed
RATIOS = {
    "match_rate": ("relations_matched", "relations"),
    "relations_per_caption": ("relations", "captions_parsed"),
    "n_unique_mean": ("unique_captions", "images_captioned"),
    "forwards_per_image": ("forwards", "images"),
    "pairs_per_forward": ("pairs", "forwards"),
}
#: settings reported by a stage (the largest value seen is kept)
MAXIMA = {"micro_batch", "processes_used"}


def merge_stats(parts: list[dict]) -> dict:
    """Merge per-batch stage stats: counts are summed, `top_*` tables merged (50 largest kept), ratios recomputed."""
    total: Counter = Counter()
    tops: dict[str, Counter] = {}
    maxima: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            if k.startswith("top_") and isinstance(v, dict):
                tops.setdefault(k, Counter()).update(v)
            elif k in RATIOS or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            elif k in MAXIMA:
                maxima[k] = max(maxima.get(k, v), v)
            else:
                total[k] += v
    out: dict = {**dict(total), **maxima}
    for k, (num, den) in RATIOS.items():
        if any(k in p for p in parts):
            out[k] = round(total[num] / total[den], 4) if total[den] else 0.0
    for k, c in tops.items():
        out[k] = dict(c.most_common(50))
    return out


def finalize_shard(ctx: RunContext, shard: int, n_batches: int) -> dict:
    """Concatenate the shard's accepted batches into `triplets/shard-XXXXX.parquet` and write its stats."""
    layout = ctx.layout
    ledger = Ledger(layout)
    unit = Unit("write", shard)
    if ledger.is_done(unit):
        return {**ledger.read(unit), "skipped": True}
    import pyarrow as pa

    tables = []
    for b in range(n_batches):
        with layout.fs.open(layout.stage_batch("threshold", shard, b), "rb") as f:
            tables.append(pq.read_table(f, schema=schemas.TRIPLETS))
    table = pa.concat_tables(tables) if tables else schemas.to_table([], Triplet)
    # one row group per shard file, sorted by image then pair then rank: stable bytes on every rerun
    table = table.sort_by(
        [
            ("image_id", "ascending"),
            ("subject_ann_id", "ascending"),
            ("object_ann_id", "ascending"),
            ("relation_rank", "ascending"),
            ("relation", "ascending"),
        ]
    )
    n, nbytes = write_table(layout.fs, layout.triplets(shard), table, schemas.TRIPLETS)
    per_stage = {}
    for stage in STAGE_DIRS:
        per_stage[stage] = merge_stats(
            [ledger.read(Unit(stage, shard, b)).get("stats", {}) for b in range(n_batches)]
        )
    images = _shard_images(ctx, shard)
    stats = {
        "shard": shard,
        "run_key": ctx.run_key,
        "images": len(images),
        "boxes": sum(len(im.boxes) for im in images),
        "triplets": n,
        "images_with_triplets": len(set(table.column("image_id").to_pylist())) if n else 0,
        "stages": per_stage,
    }
    write_json(layout.fs, layout.shard_stats(shard), stats)
    info = {"rows": n, "bytes": nbytes, "stats": {"triplets": n}}
    ledger.record_done(unit, info)
    return info
