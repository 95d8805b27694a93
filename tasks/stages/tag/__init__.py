"""Tag stage: every candidate (pair, relation text) scored by one of the taggers (greedy overlap, R-Tagger, CLIP).

A tagger is one module here and one entry in TAGGERS: the settings that change its scores, its model
identity, and how it tags a batch. The stage itself counts the rows (tag_rows) and ranks nothing: each
tagger returns its rows ranked within their pairs. With the region stage on, the candidates are the match
stage's and the region stage's (stage_candidates)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from storage.records import Candidate, ImageRecord, RegionCaption, TaggedRelation
from tasks.config import PipelineConfig
from tasks.run.context import RunContext, batch_images, load_pixels, read_stage
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.run.revisions import model_dir_revision
from tasks.stages.region import merge_region_candidates, region_in_run
from tasks.stages.tag.common import GREEDY, tag_greedy
from tasks.stats import Count


@dataclass(frozen=True)
class TaggerEntry:
    """A tagger as the tag stage knows it: output-changing settings, revision, and how it tags a batch."""

    name: str
    settings: Callable[[PipelineConfig], dict]
    revision: Callable[[PipelineConfig], str]
    run: Callable[[RunContext, list[ImageRecord], list[Candidate]], StageOutput]
    on_cpu_only: bool = False  # reads no model: runs on the CPU whatever tag.device says


def _tag_greedy(ctx, images, candidates) -> StageOutput:
    rows, stats = tag_greedy(images, candidates)
    return StageOutput(rows, stats=stats)


def _with_pixels(ctx, images, candidates, fn) -> StageOutput:
    need = {c.image_id for c in candidates}
    kept, pixels, quarantined = load_pixels(ctx, [im for im in images if im.image_id in need], stage="tag")
    ok = {im.image_id for im in kept}
    rows, stats = fn(kept, pixels, [c for c in candidates if c.image_id in ok])
    return StageOutput(rows, quarantined, stats)


def _tag_rtagger(ctx, images, candidates) -> StageOutput:
    from tasks.stages.tag.rtagger import RTaggerRunner, tag_batch_rtagger  # torch: only when it tags

    cfg = ctx.config
    runner = RTaggerRunner.from_config(cfg.tag)  # loaded once per process (cached by checkpoint and device)
    return _with_pixels(
        ctx, images, candidates,
        lambda im, px, c: tag_batch_rtagger(im, px, c, runner, cfg.tag, vocabulary=cfg.match.vocabulary),
    )  # fmt: skip


def _tag_clip(ctx, images, candidates) -> StageOutput:
    from tasks.stages.tag.clip import load_scorer, tag_batch_clip  # torch: only when it tags

    cfg = ctx.config
    return _with_pixels(
        ctx, images, candidates, lambda im, px, c: tag_batch_clip(im, px, c, load_scorer(cfg.tag), cfg.tag)
    )


#: Every tagger, by name.
TAGGERS: dict[str, TaggerEntry] = {
    GREEDY: TaggerEntry(GREEDY, lambda cfg: {}, lambda cfg: GREEDY, _tag_greedy, on_cpu_only=True),
    "rtagger": TaggerEntry(
        "rtagger",
        settings=lambda cfg: {
            "texts": cfg.tag.texts,
            "grouping": cfg.tag.grouping,
            "n_q": cfg.tag.n_q,
            "dtype": cfg.tag.dtype,
        },  # fmt: skip
        revision=lambda cfg: (
            "rtagger:" + (model_dir_revision(cfg.tag.checkpoint) if cfg.tag.checkpoint else "none")
        ),
        run=_tag_rtagger,
    ),
    "clip": TaggerEntry(
        "clip",
        settings=lambda cfg: {"dtype": cfg.tag.dtype},
        revision=lambda cfg: "clip:" + model_dir_revision(cfg.tag.clip_model, cfg.tag.clip_revision),
        run=_tag_clip,
    ),
}


def stage_candidates(ctx: RunContext, shard: int, batch: int) -> tuple[list[Candidate], int]:
    """What the tag stage scores: the match stage's candidates, plus the region stage's when the run has it on
    (de-duplicated: a (pair, relation) both have is one candidate with both captions). Returns them and how
    many the region stage added."""
    candidates = read_stage(ctx, "match", Candidate, shard, batch)
    if not region_in_run(ctx):
        return candidates, 0  # off: the region stage's batches are empty, nothing is read
    return merge_region_candidates(candidates, read_stage(ctx, "region", RegionCaption, shard, batch))


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    candidates, from_region = stage_candidates(ctx, shard, batch)
    out = TAGGERS[ctx.config.tag.tagger].run(ctx, batch_images(ctx, shard, batch), candidates)
    out.stats.put("tag_rows", Count(len(out.rows)))  # counted here, for every tagger: the funnel reads it
    out.stats.put("candidates_from_region", Count(from_region))
    return out


def _device(cfg: PipelineConfig) -> str:
    return "cpu" if TAGGERS[cfg.tag.tagger].on_cpu_only else cfg.tag.device


STAGE = register(
    Stage(
        "tag", "match", TaggedRelation, "tags", "tag",
        settings=lambda cfg: {"tagger": cfg.tag.tagger, **TAGGERS[cfg.tag.tagger].settings(cfg)},
        revision=lambda cfg, inputs: TAGGERS[cfg.tag.tagger].revision(cfg),
        device=_device,
        compute=_stage_batch,
        stats=("tag_rows",),
        funnel=(FunnelRow("tagged", "tagged (pair, relation) rows", "tag_rows", lambda s: s.tally("quarantine_reasons")),),
        revision_record=("tagger", lambda cfg, inputs: TAGGERS[cfg.tag.tagger].revision(cfg)),
    )
)  # fmt: skip
