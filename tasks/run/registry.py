"""The stages of a labelling run, as one registry (after datatrove's PipelineStep).

A Stage owns its name, its input stage, its record type (and so its Arrow schema), its output folder, its
config section, the settings and model revision that change its output (its key), the device it runs on,
whether it writes rejects, and the function that computes one batch. Flows, the
ledger, `status`, the layout and the GPU slot all derive from STAGES; adding a stage is one function plus
one entry in STAGES.

Keys chain: key(stage) = hash(stage name, its settings, its revision, key(upstream), pipeline version); the
plan's key hashes the plan settings and the input checksums. A changed setting therefore changes the key of
its stage and of every stage after it, and nothing before it: the outputs of unchanged stages are reused in
place. The run key is the key of the last stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from storage.manifest import ChainLink
from storage.records import (
    Candidate,
    Caption,
    ImageRecord,
    ParsedRelation,
    Quarantined,
    TaggedRelation,
    Triplet,
    VerifiedImage,
)
from tasks.config import PipelineConfig
from tasks.run.context import RunContext, batch_images, load_pixels, plan_manifest, read_stage, vocabulary
from tasks.run.revisions import model_dir_revision
from tasks.stats import Stats

#: Bump when a stage's semantics change, so old results are never mixed with new ones.
PIPELINE_VERSION = "4"  # 3: captions and triplets carry the captions file's annotation ids; 4: the verify
# stage heads the chain and the plan checks image headers


@dataclass(slots=True)
class StageOutput:
    """What a stage computed for one batch: rows (its record type), quarantined records, stats, rejects."""

    rows: list
    quarantined: list[Quarantined] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    rejects: list = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline. `compute` is None for the shard-level write stage (tasks.run.pipeline)."""

    name: str
    input: str | None  # upstream stage (None: the plan)
    record: type | None
    folder: str
    section: str | None  # config section
    settings: Callable[[PipelineConfig], dict]  # what changes the output (devices and worker counts do not)
    revision: Callable[[PipelineConfig, dict], str]  # model / parser identity; inputs = {"captions_sha256"}
    device: Callable[[PipelineConfig], str] = lambda cfg: "cpu"
    compute: Callable[[RunContext, int, int], StageOutput] | None = None
    rejects: bool = False

    @property
    def per_batch(self) -> bool:
        return self.compute is not None


# -- taggers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaggerEntry:
    """A tagger as the tag stage knows it: output-changing settings, revision, whether it decodes images."""

    name: str
    settings: Callable[[PipelineConfig], dict]
    revision: Callable[[PipelineConfig], str]
    run: Callable[[RunContext, list[ImageRecord], list[Candidate]], StageOutput]


def _tag_greedy(ctx, images, candidates) -> StageOutput:
    from tasks.stages.tag.common import tag_greedy

    rows, stats = tag_greedy(images, candidates)
    return StageOutput(rows, stats=stats)


def _with_pixels(ctx, images, candidates, fn) -> StageOutput:
    need = {c.image_id for c in candidates}
    kept, pixels, quarantined = load_pixels(ctx, [im for im in images if im.image_id in need], stage="tag")
    ok = {im.image_id for im in kept}
    rows, stats = fn(kept, pixels, [c for c in candidates if c.image_id in ok])
    return StageOutput(rows, quarantined, stats)


def _tag_rtagger(ctx, images, candidates) -> StageOutput:
    from tasks.stages.tag.rtagger import RTaggerRunner, tag_batch_rtagger

    cfg = ctx.config
    runner = RTaggerRunner.from_config(cfg.tag)  # loaded once per process (cached by checkpoint and device)
    return _with_pixels(
        ctx, images, candidates,
        lambda im, px, c: tag_batch_rtagger(im, px, c, runner, cfg.tag, vocabulary=cfg.match.vocabulary),
    )  # fmt: skip


def _tag_clip(ctx, images, candidates) -> StageOutput:
    from tasks.stages.tag.clip import load_scorer, tag_batch_clip

    cfg = ctx.config
    return _with_pixels(
        ctx, images, candidates, lambda im, px, c: tag_batch_clip(im, px, c, load_scorer(cfg.tag), cfg.tag)
    )


#: Every tagger, by name.
TAGGERS: dict[str, TaggerEntry] = {
    "greedy_overlap": TaggerEntry(
        "greedy_overlap", lambda cfg: {}, lambda cfg: "greedy_overlap", _tag_greedy
    ),
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


# -- the stages' batch functions -----------------------------------------------------------------------------


def _verify(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    from tasks.stages.verify import verify_batch

    plan = ctx.config.plan
    rows, quarantined, stats = verify_batch(
        batch_images(ctx, shard, batch), ctx.images_root, plan.max_pixels, plan.decode_threads()
    )
    return StageOutput(rows, quarantined, stats)


def _caption(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    from tasks.stages.caption import batch_seed, caption_batch
    from tasks.run.pipeline import captioners
    from tasks.stages.verify import verified_images

    out = caption_batch(
        verified_images(ctx, shard, batch),  # only images the verify stage decoded in full
        list(captioners(ctx.config_json, ctx.captions_file)),
        ctx.images_root,
        batch_seed(ctx.key("caption"), shard, batch),  # the caption stage's key: reused captions, same seeds
        ctx.config.caption,
    )
    return StageOutput(out.captions, out.quarantine, out.stats)


def _parse(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    from tasks.stages.parse import parse_batch

    out = parse_batch(read_stage(ctx, "caption", Caption, shard, batch), ctx.config.parse)
    return StageOutput(out.relations, stats=out.stats)


def _match(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    from tasks.stages.match import match_batch

    cfg = ctx.config
    cats = json.dumps(plan_manifest(ctx).categories, sort_keys=True)
    # caption texts, for the example captions of unmatched nouns in the stats
    texts = {(c.image_id, c.caption_id): c.text for c in read_stage(ctx, "caption", Caption, shard, batch)}
    out = match_batch(
        batch_images(ctx, shard, batch),
        read_stage(ctx, "parse", ParsedRelation, shard, batch),
        cfg.match,
        vocabulary(cats, cfg.match.vocabulary),
        texts,
    )
    return StageOutput(out.candidates, stats=out.stats)


def _tag(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    entry = TAGGERS[ctx.config.tag.tagger]
    return entry.run(ctx, batch_images(ctx, shard, batch), read_stage(ctx, "match", Candidate, shard, batch))


def _threshold(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    from tasks.stages.threshold import threshold_batch

    accepted, rejects, stats = threshold_batch(
        batch_images(ctx, shard, batch),
        read_stage(ctx, "tag", TaggedRelation, shard, batch),
        ctx.config.threshold,
        ctx.run_key,
    )
    # beside each caption position, the captions file's annotation id (human captions), for joins back to it
    source = {
        (c.image_id, c.caption_id): c.source_id for c in read_stage(ctx, "caption", Caption, shard, batch)
    }
    for t in accepted:
        t.caption_source_ids = [source.get((t.image_id, k)) for k in t.caption_ids]
    return StageOutput(accepted, stats=stats, rejects=rejects)


def _caption_settings(cfg: PipelineConfig) -> dict:
    from tasks.stages.caption import captioner_entries

    return {e.name: e.settings(cfg.caption) for e in captioner_entries(cfg.caption)}


def _caption_revision(cfg: PipelineConfig, inputs: dict) -> str:
    from tasks.stages.caption import captioner_entries

    return ",".join(
        e.revision(cfg.caption, inputs.get("captions_sha256")) for e in captioner_entries(cfg.caption)
    )


def _parser_revision(cfg: PipelineConfig, inputs: dict) -> str:
    from tasks.run.revisions import package_version as v

    model = cfg.parse.spacy_model
    return (
        f"SceneGraphParser=={v('SceneGraphParser')};spacy=={v('spacy')};{model}=={v(model.replace('_', '-'))}"
    )


def _model_device(section: str) -> Callable[[PipelineConfig], str]:
    def device(cfg: PipelineConfig) -> str:
        from tasks.stages.caption import captioner_names

        if section == "caption" and all(n == "oracle" for n in captioner_names(cfg.caption)):
            return "cpu"
        if section == "tag" and cfg.tag.tagger == "greedy_overlap":
            return "cpu"
        return getattr(cfg, section).device

    return device


def _no_revision(cfg: PipelineConfig, inputs: dict) -> str:
    return ""


#: The pipeline, in order. The last stage's key is the run key.
STAGES: tuple[Stage, ...] = (
    # every planned image decoded in full before any other stage sees it (tasks/stages/verify.py)
    Stage(
        "verify", None, VerifiedImage, "verified", "plan", lambda cfg: {"max_pixels": cfg.plan.max_pixels},
        _no_revision, compute=_verify,
    ),
    Stage(
        "caption", "verify", Caption, "captions", "caption", _caption_settings, _caption_revision,
        device=_model_device("caption"), compute=_caption,
    ),
    Stage(
        "parse", "caption", ParsedRelation, "parses", "parse",
        lambda cfg: cfg.parse.model_dump(mode="json", exclude={"processes"}), _parser_revision, compute=_parse,
    ),
    Stage(
        "match", "parse", Candidate, "candidates", "match", lambda cfg: cfg.match.model_dump(mode="json"),
        _no_revision, compute=_match,
    ),
    Stage(
        "tag", "match", TaggedRelation, "tags", "tag",
        lambda cfg: {"tagger": cfg.tag.tagger, **TAGGERS[cfg.tag.tagger].settings(cfg)},
        lambda cfg, inputs: TAGGERS[cfg.tag.tagger].revision(cfg), device=_model_device("tag"), compute=_tag,
    ),
    Stage(
        "threshold", "tag", Triplet, "accepted", "threshold", lambda cfg: cfg.threshold.model_dump(mode="json"),
        _no_revision, compute=_threshold, rejects=True,
    ),
    # one Parquet triplet file and one stats file per shard, from the threshold stage's batches
    Stage("write", "threshold", Triplet, "triplets", None, lambda cfg: {}, _no_revision),
)  # fmt: skip

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
BATCH_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.per_batch)


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages are {[s.name for s in STAGES]}")
    return BY_NAME[name]


def folders() -> tuple[tuple[str, str], ...]:
    return tuple((s.name, s.folder) for s in STAGES)


def _hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_key(cfg: PipelineConfig, inputs: dict) -> str:
    """The plan's key: plan settings, the annotation file's checksum and the image root (the plan checks the
    images, so a plan made against one folder is not reused for another)."""
    return _hash(
        {"stage": "plan", "settings": cfg.plan.model_dump(mode="json", exclude={"image_threads"}),
         "inputs": {"annotations_sha256": inputs["annotations_sha256"], "images_root": inputs.get("images_root")},
         "pipeline": PIPELINE_VERSION}
    )  # fmt: skip


def chain(cfg: PipelineConfig, inputs: dict) -> tuple[str, list[ChainLink]]:
    """(plan key, one ChainLink per stage in order): each stage's key chains to its upstream's."""
    upstream = plan_key(cfg, inputs)
    plan = upstream
    links = []
    for s in STAGES:
        settings, revision = s.settings(cfg), s.revision(cfg, inputs)
        key = _hash(
            {"stage": s.name, "settings": settings, "revision": revision, "upstream": upstream,
             "pipeline": PIPELINE_VERSION}
        )  # fmt: skip
        links.append(ChainLink(s.name, key, upstream, settings, revision))
        upstream = key
    return plan, links
