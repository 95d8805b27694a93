"""Region stage: dense captioning on pairwise union regions (paper Table 21, last row), off by default.

For every candidate pair of the match stage (both orders of two boxes are one union), the union box of the two
boxes is cropped from the image and captioned by BLIP with beam search (one caption); the caption is parsed by
the parse stage's parser and matched by the match stage's own matcher (`match_batch`, the run's vocabulary and
match.mode) against THAT pair's two boxes only. A relation whose subject names one box's class and whose object
names the other's is a candidate for that pair in that orientation. The tag stage scores these candidates with
the match stage's, de-duplicated against them (tasks/stages/tag/__init__.py, `merge_region_candidates`).

Region captions get caption ids -1, -2, ... per image (in pair order), so they never collide with the
positions of the image's own captions (0..). Disabled, the stage loads nothing and writes empty batches.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.captioners.base import Captioner
from models.matcher import Vocabulary
from storage.records import Candidate, Caption, ImageRecord, Quarantined, RegionCaption
from tasks.config import CaptionConfig, MatchConfig, ParseConfig, PipelineConfig, cli
from tasks.images import load_image
from tasks.run.context import RunContext, batch_images, process_resource, read_stage, run_vocabulary
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.run.revisions import model_dir_revision
from tasks.stages.caption import run_captioner
from tasks.stages.match import match_batch
from tasks.stages.parse import parse_batch
from tasks.stats import Count, Label, Max, Stats, Tally

#: region caption ids are int16 in the schema: -1 .. -32768, so at most this many region captions per image
MAX_REGION_CAPTIONS = 32768


class RegionConfig(BaseModel):
    """Dense captioning on pairwise union regions (paper Table 21, last row): BLIP beam search on the union box
    of every candidate pair, its relations matched to that pair only. Off by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        False,
        description="caption the union box of every candidate pair and add the relations that name both of "
        "its classes as candidates of that pair (true/false)",
        json_schema_extra=cli("region-captions"),
    )
    model: str | None = Field(
        None,
        description="BLIP: hub id or local directory; none = caption.model",
        json_schema_extra=cli("region-model"),
    )
    model_revision: str | None = Field(
        None, description="hub revision of model; none = caption.model_revision"
    )
    num_beams: int = Field(
        3, ge=1, description="beam width (one caption per union box)", json_schema_extra=cli("region-beams")
    )
    max_length: int = Field(20, ge=2, description="tokens, prompt included")
    min_length: int = Field(5, ge=0, description="tokens, prompt included")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="beam search's; 1.0 = none, as BLIP's generate"
    )
    prompt: str = "a picture of "
    image_size: int | None = Field(None, ge=16, description="BLIP input side; none = the model's own (384)")
    max_pairs: int | None = Field(
        None,
        ge=1,
        le=MAX_REGION_CAPTIONS,
        description="union boxes captioned per image at most, in the match stage's pair order (the rest are "
        f"counted as beyond_max_pairs); none = all (up to {MAX_REGION_CAPTIONS})",
        json_schema_extra=cli("region-max-pairs"),
    )
    batch_size: int = Field(
        32, ge=1, description="union crops per generate call", json_schema_extra=cli("region-batch-size")
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="the region captioner's weights and activations; none = caption.dtype"
    )
    device: str | None = Field(
        None,
        description="cpu, cuda or cuda:N (in no key); none = caption.device",
        json_schema_extra=cli("region-device"),
    )


@dataclass(frozen=True)
class RegionModel:
    """The region captioner's resolved identity and settings (the region section's none = the caption's)."""

    model: str
    revision: str
    dtype: str
    device: str


def resolved(cfg: RegionConfig, cap: CaptionConfig) -> RegionModel:
    return RegionModel(
        cfg.model or cap.model,
        cfg.model_revision or cap.model_revision,
        cfg.dtype or cap.dtype,
        cfg.device or cap.device,
    )


@dataclass(slots=True)
class RegionOutput:
    rows: list[RegionCaption]
    quarantine: list[Quarantined] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


@dataclass(slots=True)
class _Pair:
    image: ImageRecord
    a: object  # Box
    b: object
    caption_id: int
    crop: tuple[int, int, int, int] | None = None  # left, top, right, bottom (pixels)
    text: str | None = None


def union_pairs(candidates: list[Candidate]) -> dict[int, list[tuple[int, int]]]:
    """Per image, its candidate pairs with both orders as one: (first ann id, second ann id) in the orientation
    the candidates meet the pair first, in candidate order."""
    out: dict[int, dict[frozenset, tuple[int, int]]] = {}
    for c in candidates:
        out.setdefault(c.image_id, {}).setdefault(
            frozenset((c.subject_ann_id, c.object_ann_id)), (c.subject_ann_id, c.object_ann_id)
        )
    return {i: list(p.values()) for i, p in out.items()}


def union_crop(a, b, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The pixel rectangle (left, top, right, bottom) of the union of boxes a and b (x, y, w, h), widened to whole
    pixels and clamped to the image; None when nothing of it is inside the image."""
    x0, y0 = min(a.x, b.x), min(a.y, b.y)
    x1, y1 = max(a.x + a.w, b.x + b.w), max(a.y + a.h, b.y + b.h)
    left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
    right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if not (right > left and bottom > top):
        return None
    return left, top, right, bottom


def _pair_image(k: int, p: _Pair) -> ImageRecord:
    """The pair as an image of its own for the matcher: only its two boxes (the file order and class order the
    reference mode needs, restricted to them), so a relation can only match this pair."""
    im = p.image
    idx = [j for j, bx in enumerate(im.boxes) if bx.ann_id in (p.a.ann_id, p.b.ann_id)]
    classes = {p.a.category_id, p.b.category_id}
    return ImageRecord(
        k, im.file_name, im.width, im.height, im.shard, [im.boxes[j] for j in idx],
        None if im.box_file_index is None else [im.box_file_index[j] for j in idx],
        None if im.class_order is None else [c for c in im.class_order if c in classes],
    )  # fmt: skip


def _pair_reason(key: str) -> str:
    # the matcher's reasons, said of the pair: its "image" is the pair
    return key.replace("class_not_in_image", "class_not_in_pair").replace(
        "no_class_in_image", "no_class_in_pair"
    )


def region_batch(
    images: list[ImageRecord],
    candidates: list[Candidate],
    captioner: Captioner,
    image_root: str,
    cfg: RegionConfig,
    parse_cfg: ParseConfig,
    match_cfg: MatchConfig,
    vocab: Vocabulary,
    parser=None,
) -> RegionOutput:
    """Caption the union box of every candidate pair, parse the captions and match their relations to their pair.

    Pure function (no Prefect). An image that cannot be decoded, and a pair whose union box has no pixel inside
    the image, are quarantined with the reason; the rest go on. Crops are captioned cfg.batch_size per generate
    call (a CUDA out-of-memory error halves that and retries, as in the caption stage).

    Args:
        images: the batch's images with their boxes.
        candidates: the match stage's candidates of these images (their pairs are captioned).
        captioner: a captioner with n_cap 1 (beam search): one caption per crop.
        image_root: folder or fsspec URI of the images.
        cfg: the region settings (max_pairs, batch_size).
        parse_cfg, parser: the parse stage's settings and parser (None: the process-wide one for parse_cfg).
        match_cfg, vocab: the match stage's settings and the run's vocabulary.
    Returns:
        One RegionCaption row per (caption, candidate it gave), or one per caption that gave none; the match
        stage's candidates are not in them, but `is_new` says whether a row's (pair, relation) is one of them.
    """
    by_id = {im.image_id: im for im in images}
    cap = min(cfg.max_pairs or MAX_REGION_CAPTIONS, MAX_REGION_CAPTIONS)
    pairs: list[_Pair] = []
    n_pairs = n_capped = 0
    for image_id, ps in union_pairs(candidates).items():
        im = by_id.get(image_id)
        if im is None:
            raise ValueError(f"candidate of image {image_id} is not in this region batch's images")
        boxes = {b.ann_id: b for b in im.boxes}
        n_pairs += len(ps)
        n_capped += max(0, len(ps) - cap)
        for k, (a, b) in enumerate(ps[:cap]):
            if a not in boxes or b not in boxes:
                raise ValueError(
                    f"candidate pair ({a}, {b}) of image {image_id} names a box the image does not have"
                )
            pairs.append(_Pair(im, boxes[a], boxes[b], -1 - k))

    quarantine: list[Quarantined] = []
    not_captioned: Counter = Counter()
    state = {"oom_halvings": 0, "micro_batch": cfg.batch_size}
    counting = _Counting(captioner)
    pending: list[tuple[_Pair, object]] = []

    def flush():
        if not pending:
            return
        recs = [_crop_record(p) for p, _ in pending]
        texts = run_captioner(counting, recs, [px for _, px in pending], 0, state["micro_batch"], state)
        for (p, _), t in zip(pending, texts, strict=True):
            if len(t) != 1:
                raise ValueError(
                    f"region captioner {captioner.name} returned {len(t)} captions for the union box of pair "
                    f"({p.a.ann_id}, {p.b.ann_id}) of image {p.image.image_id}; it must be set to one (n_cap 1)"
                )
            p.text = t[0]
        pending.clear()

    k = 0
    while k < len(pairs):  # one image at a time: its pixels are held only while its pairs are cropped
        im = pairs[k].image
        mine = []
        while k < len(pairs) and pairs[k].image is im:
            mine.append(pairs[k])
            k += 1
        pixels, q = load_image(image_root, im, stage="region")
        if q is not None:
            q.detail += f" ({len(mine)} union boxes not captioned)"
            quarantine.append(q)
            not_captioned[q.reason] += len(mine)
            continue
        for p in mine:
            p.crop = union_crop(p.a, p.b, *pixels.size)
            if p.crop is None:
                quarantine.append(_empty_union(p, pixels.size))
                not_captioned["empty_union_box"] += 1
                continue
            pending.append((p, pixels.crop(p.crop)))
            if len(pending) >= cfg.batch_size:
                flush()
    flush()

    done = [p for p in pairs if p.text is not None]
    captions = [
        Caption(k, p.caption_id, p.text, False, captioner.name, captioner.revision, "")
        for k, p in enumerate(done)
    ]
    parsed = parse_batch(captions, parse_cfg, parser)
    matched = match_batch([_pair_image(k, p) for k, p in enumerate(done)], parsed.relations, match_cfg, vocab)

    known = {(c.image_id, c.subject_ann_id, c.object_ann_id, c.relation) for c in candidates}
    known_pairs = {(c.image_id, c.subject_ann_id, c.object_ann_id) for c in candidates}
    per_pair: dict[int, list[Candidate]] = {}
    for c in matched.candidates:
        per_pair.setdefault(c.image_id, []).append(c)
    n_rel = Counter(r.image_id for r in parsed.relations)
    sampling = json.dumps(captioner.sampling(), sort_keys=True)
    rows: list[RegionCaption] = []
    new_pairs = set()
    for k, p in enumerate(done):
        left, top, right, bottom = p.crop
        base = dict(
            image_id=p.image.image_id, box_a_ann_id=p.a.ann_id, box_b_ann_id=p.b.ann_id,
            union_box=[float(left), float(top), float(right - left), float(bottom - top)], caption_id=p.caption_id,
            text=p.text, captioner=captioner.name, captioner_revision=captioner.revision, sampling=sampling,
            n_relations=n_rel.get(k, 0),
        )  # fmt: skip
        if k not in per_pair:
            rows.append(RegionCaption(**base))
            continue
        for c in per_pair[k]:
            key = (p.image.image_id, c.subject_ann_id, c.object_ann_id, c.relation)
            is_new = key not in known
            if is_new and key[:3] not in known_pairs:
                new_pairs.add(key[:3])
            rows.append(
                RegionCaption(
                    **base,
                    subject_ann_id=c.subject_ann_id,
                    object_ann_id=c.object_ann_id,
                    subject_category_id=c.subject_category_id,
                    object_category_id=c.object_category_id,
                    subject_label=c.subject_label,
                    object_label=c.object_label,
                    relation=c.relation,
                    relation_lemma=c.relation_lemma,
                    subject_rule=c.subject_rule,
                    subject_synonym=c.subject_synonym,
                    object_rule=c.object_rule,
                    object_synonym=c.object_synonym,
                    is_new=is_new,
                )  # fmt: skip
            )
    ms, ps_ = matched.stats, parsed.stats
    n_cands = sum(r.relation is not None for r in rows)
    n_new = sum(bool(r.is_new) for r in rows)
    stats = Stats(
        enabled=Label.of(True),
        images=Count(len(images)),
        images_with_pairs=Count(len({p.image.image_id for p in pairs})),
        pairs=Count(n_pairs),
        pairs_beyond_cap=Count(n_capped),
        pairs_not_captioned=Tally(dict(not_captioned)),
        region_captions=Count(len(done)),
        unique_region_captions=Count(
            len({(p.image.image_id, " ".join(p.text.lower().split())) for p in done})
        ),
        captions_not_parsed=Count(ps_.count("captions_not_parsed")),
        captions_without_relations=Count(ps_.count("captions_without_relations")),
        region_relations=Count(len(parsed.relations)),
        relations_matched=Count(ms.count("relations_matched")),
        # per relation lost (the match stage's reasons), and per entity side: what it named, said of the pair
        relations_unmatched=Tally(ms.tally("relations_unmatched")),
        entities_unmatched=Tally({_pair_reason(k): v for k, v in ms.tally("entity_unmatched").items()}),
        relations_without_pairs=Count(ms.count("relations_without_pairs")),
        region_candidates=Count(n_cands),
        new_candidates=Count(n_new),
        confirmed_candidates=Count(n_cands - n_new),
        new_pairs=Count(len(new_pairs)),
        top_new_relations=Tally.of((r.relation for r in rows if r.is_new), top=25),
        generate_calls=Count(counting.calls),  # out-of-memory tries included
        micro_batch=Max(state["micro_batch"] if done else 0),
        oom_halvings=Count(state["oom_halvings"]),
    )
    return RegionOutput(rows, quarantine, stats)


class _Counting:
    """A captioner that counts its caption calls (one generate call each)."""

    def __init__(self, captioner: Captioner):
        self.captioner, self.name, self.calls = captioner, captioner.name, 0

    def caption(self, images, pixels, seed):
        self.calls += 1
        return self.captioner.caption(images, pixels, seed)


def _crop_record(p: _Pair) -> ImageRecord:
    # what the captioner is told of a crop: the image's id (for seeds) and the pair's two boxes
    left, top, right, bottom = p.crop
    return ImageRecord(
        p.image.image_id, p.image.file_name, right - left, bottom - top, p.image.shard, [p.a, p.b]
    )


def _empty_union(p: _Pair, size: tuple[int, int]) -> Quarantined:
    a, b = p.a, p.b
    values = {"image_id": p.image.image_id, "pair": [a.ann_id, b.ann_id],
              "boxes": [[a.x, a.y, a.w, a.h], [b.x, b.y, b.w, b.h]], "image_size": list(size)}  # fmt: skip
    return Quarantined(
        "region", p.image.image_id, f"{p.image.file_name} pair ({a.ann_id}, {b.ann_id})", "empty_union_box",
        f"{p.image.file_name}: the union of boxes {a.ann_id} {[a.x, a.y, a.w, a.h]} and {b.ann_id} "
        f"{[b.x, b.y, b.w, b.h]} has no pixel inside the {size[0]}x{size[1]} image",
        json.dumps(values),
    )  # fmt: skip


def merge_region_candidates(
    candidates: list[Candidate], rows: list[RegionCaption]
) -> tuple[list[Candidate], int]:
    """The match stage's candidates with the region stage's: a (pair, relation) both have gets the region
    caption's id added to its caption_ids; a new one is added after the last candidate of its image. Returns the
    candidates and how many were added."""
    out = [
        replace(c, caption_ids=list(c.caption_ids)) for c in candidates
    ]  # the caller's rows stay unchanged
    index = {(c.image_id, c.subject_ann_id, c.object_ann_id, c.relation): c for c in out}
    added: dict[int, list[Candidate]] = {}
    for r in rows:
        if r.relation is None:
            continue
        key = (r.image_id, r.subject_ann_id, r.object_ann_id, r.relation)
        c = index.get(key)
        if c is not None:
            if r.caption_id not in c.caption_ids:
                c.caption_ids = sorted([*c.caption_ids, r.caption_id])
                c.n_captions = len(c.caption_ids)
            continue
        c = Candidate(
            r.image_id, r.subject_ann_id, r.object_ann_id, r.subject_category_id, r.object_category_id,
            r.subject_label, r.object_label, r.relation, r.relation_lemma, [r.caption_id], 1, r.subject_rule,
            r.subject_synonym, r.object_rule, r.object_synonym,
        )  # fmt: skip
        index[key] = c
        added.setdefault(r.image_id, []).append(c)
    if not added:
        return out, 0
    merged: list[Candidate] = []
    last = {c.image_id: i for i, c in enumerate(out)}
    for i, c in enumerate(out):
        merged.append(c)
        if last[c.image_id] == i:
            merged.extend(added.pop(c.image_id, []))
    for extra in added.values():  # images the match stage gave nothing (not from region_batch)
        merged.extend(extra)
    return merged, len(merged) - len(out)


# -- the stage ---------------------------------------------------------------------------------------------


def region_config(cfg: PipelineConfig) -> RegionConfig:
    return cfg.section("region")


def region_in_run(ctx: RunContext) -> bool:
    """Whether the run's chain has the region stage and it is on (the tag stage then reads its candidates)."""
    return "region" in dict(ctx.stage_keys) and region_config(ctx.config).enabled


def build_region_captioner(cfg: PipelineConfig) -> Captioner:
    from models.captioners.blip import BlipCaptioner  # torch and transformers: only when it captions

    rc, m = region_config(cfg), resolved(region_config(cfg), cfg.caption)
    return BlipCaptioner.load(
        m.model, m.revision, image_size=rc.image_size, dtype=m.dtype, device=m.device, n_cap=1,
        num_beams=rc.num_beams, max_length=rc.max_length, min_length=rc.min_length,
        beam_repetition_penalty=rc.repetition_penalty, prompt=rc.prompt,
    )  # fmt: skip


def _off() -> Stats:
    zero = Count(0)
    return Stats(enabled=Label.of(False), **{s: zero for s in _STATS if s != "enabled"})


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    cfg = ctx.config
    if not region_config(cfg).enabled:
        return StageOutput([], stats=_off())  # no model, no pixels, no parse
    captioner = process_resource(  # one load per worker process
        ("region-captioner", json.dumps(_settings(cfg), sort_keys=True), _revision(cfg, {}), _device(cfg)),
        lambda: build_region_captioner(cfg),
    )
    out = region_batch(
        batch_images(ctx, shard, batch), read_stage(ctx, "match", Candidate, shard, batch), captioner,
        ctx.images_root, region_config(cfg), cfg.parse, cfg.match, run_vocabulary(ctx),
    )  # fmt: skip
    return StageOutput(out.rows, out.quarantine, out.stats)


def _settings(cfg: PipelineConfig) -> dict:
    rc = region_config(cfg)
    if not rc.enabled:
        return {"enabled": False}  # nothing else changes an empty output
    return {
        **rc.model_dump(mode="json", exclude={"model", "model_revision", "device", "dtype"}),
        "dtype": resolved(rc, cfg.caption).dtype,
    }


def _revision(cfg: PipelineConfig, inputs: dict) -> str:
    rc = region_config(cfg)
    if not rc.enabled:
        return ""
    m = resolved(rc, cfg.caption)
    return "blip:" + model_dir_revision(m.model, m.revision)


def _device(cfg: PipelineConfig) -> str:
    rc = region_config(cfg)
    return resolved(rc, cfg.caption).device if rc.enabled else "cpu"


_STATS = ("enabled", "region_captions", "region_relations", "new_candidates", "region_candidates",
          "captions_not_parsed", "captions_without_relations", "relations_without_pairs", "pairs_beyond_cap")  # fmt: skip

STAGE = register(
    Stage(
        "region", "match", RegionCaption, "regions", "region",
        settings=_settings,
        revision=_revision,
        device=_device,
        compute=_stage_batch,
        stats=_STATS,
        funnel=(
            FunnelRow("region_captions", "union-region captions (one per candidate pair; region stage)",
                      "region_captions",
                      lambda s: {**s.tally("pairs_not_captioned"), "beyond_max_pairs": s.count("pairs_beyond_cap")}),
            FunnelRow("region_relations", "relations parsed from union-region captions", "region_relations",
                      lambda s: {"not_parsed": s.count("captions_not_parsed"),
                                 "no_relation": s.count("captions_without_relations")}),
            FunnelRow("region_new_candidates", "region candidates beyond the match stage's (pair, relation)",
                      "new_candidates",
                      lambda s: {**s.tally("relations_unmatched"),
                                 "no_distinct_box_pair": s.count("relations_without_pairs"),
                                 "already_a_match_candidate": s.count("region_candidates") - s.count("new_candidates")}),
        ),
        revision_record=("region_captioner", lambda cfg, inputs: _revision(cfg, inputs) or "off"),
        config=RegionConfig,
    )
)  # fmt: skip
