"""Threshold stage: keep tagged relations with confidence >= eta (and, optionally, overlapping boxes and the top-K
of their pair); the rest become rejects with the reason."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict

from storage import rules
from storage.records import Caption, ImageRecord, Reject, TaggedRelation, Triplet
from tasks.config import ThresholdConfig
from tasks.run.context import RunContext, batch_images, read_stage
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.stages.tag.common import CLIP, confidence_order
from tasks.stats import ETAS, Count, Histogram, Stats, Tally


def confidence(row: TaggedRelation, rule: str) -> float:
    """A tagged row's confidence under `rule` (storage.rules: the paper's product, or p_relation alone)."""
    return rules.confidence(rule, row.p_subject, row.p_object, row.p_relation)


def cut_for(row: TaggedRelation, cfg: ThresholdConfig) -> float:
    """The threshold a row is held to: clip_eta for the CLIP tagger (the reference keeps softmax >= 0.8 there),
    eta for every other tagger."""
    return cfg.clip_eta if row.tagger == CLIP else cfg.eta


def threshold_batch(
    images: list[ImageRecord], tags: list[TaggedRelation], cfg: ThresholdConfig, run_key: str
) -> tuple[list[Triplet], list[Reject], Stats]:
    """Split tagged relations into accepted triplets (with boxes and provenance) and rejects.

    Steps, each naming its rejects' reason:
      1. confidence (cfg.rule) >= eta, or >= clip_eta for rows of the CLIP tagger: `below_eta` (NaN:
         `nan_confidence`);
      2. cfg.overlap_filter: the subject and object boxes share an area > 0 (storage.rules.boxes_overlap, the
         greedy baseline's rule): `no_overlap`;
      3. cfg.top_k: at most K relations per (image, subject, object) among the survivors, by that confidence,
         then supporting captions, then text: `beyond_top_k`.
    The order follows the reference's pre-training loader (confidence threshold, then the overlap filter); as
    overlap is a property of the pair and top-K keeps the best, the accepted set does not depend on it.
    """
    boxes = {(im.image_id, b.ann_id): b for im in images for b in im.boxes}
    reasons: Counter = Counter()
    verdict: list[str | None] = []  # per tag row: None = accepted, else the reason
    confs: list[float] = []
    for t in tags:
        conf = confidence(t, cfg.rule)
        confs.append(conf)
        reason = None
        if not conf >= cut_for(t, cfg):  # also rejects NaN
            reason = "nan_confidence" if conf != conf else "below_eta"
        elif cfg.overlap_filter and not rules.boxes_overlap(
            boxes[(t.image_id, t.subject_ann_id)], boxes[(t.image_id, t.object_ann_id)]
        ):
            reason = "no_overlap"
        verdict.append(reason)
    if cfg.top_k is not None:
        by_pair: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for i, t in enumerate(tags):
            if verdict[i] is None:
                by_pair[(t.image_id, t.subject_ann_id, t.object_ann_id)].append(i)
        for idx in by_pair.values():
            idx.sort(key=lambda i: confidence_order(confs[i], tags[i].n_captions, tags[i].relation))
            for i in idx[cfg.top_k :]:
                verdict[i] = "beyond_top_k"
    accepted, rejects = [], []
    for t, conf, reason in zip(tags, confs, verdict):
        if reason is not None:
            reasons[reason] += 1
            rejects.append(
                Reject(
                    t.image_id,
                    t.subject_ann_id,
                    t.object_ann_id,
                    t.subject_label,
                    t.object_label,
                    t.relation,
                    conf,
                    t.p_subject,
                    t.p_object,
                    t.p_relation,
                    t.caption_ids,
                    reason,
                    run_key,
                )
            )
            continue
        sb, ob = boxes[(t.image_id, t.subject_ann_id)], boxes[(t.image_id, t.object_ann_id)]
        accepted.append(
            Triplet(
                t.image_id,
                t.subject_ann_id,
                t.object_ann_id,
                t.subject_category_id,
                t.object_category_id,
                t.subject_label,
                t.object_label,
                [sb.x, sb.y, sb.w, sb.h],
                [ob.x, ob.y, ob.w, ob.h],
                t.relation,
                t.relation_lemma,
                conf,
                t.p_subject,
                t.p_object,
                t.p_relation,
                t.relation_rank,
                t.caption_ids,
                t.n_captions,
                t.tagger,
                run_key,
            )
        )
    stats = Stats(
        accepted=Count(len(accepted)),
        rejected=Count(len(rejects)),
        **{f"rejected_{k}": Count(v) for k, v in sorted(reasons.items())},
        reject_reasons=Tally(dict(reasons)),
        top_relations=Tally.of((a.relation for a in accepted), top=50),
    )
    return accepted, rejects, stats.merge(audit_stats(images, tags, confs, accepted, cfg))


def audit_stats(
    images: list[ImageRecord], tags: list[TaggedRelation], confs: list[float], accepted: list[Triplet],
    cfg: ThresholdConfig,
) -> Stats:  # fmt: skip
    """What an auditor needs from the threshold stage, all hidden from the stage's own view (the run's audit
    shows them): relation (lemma) and class-pair tallies over accepted triplets, histograms of the three
    factors and of the confidence over every tagged row, and the eta sweep (sweep_counts)."""
    triplets, images_kept = sweep_counts(images, tags, cfg)
    return Stats(
        relation_lemmas=Tally.of((a.relation_lemma for a in accepted), hidden=True),
        class_pairs=Tally.of(((a.subject_label, a.object_label) for a in accepted), hidden=True),
        hist_p_subject=Histogram.of((t.p_subject for t in tags), hidden=True),
        hist_p_object=Histogram.of((t.p_object for t in tags), hidden=True),
        hist_p_relation=Histogram.of((t.p_relation for t in tags), hidden=True),
        hist_confidence=Histogram.of(confs, hidden=True),
        sweep_triplets=Tally(triplets, hidden=True),
        sweep_images=Tally(images_kept, hidden=True),
    )


def sweep_counts(
    images: list[ImageRecord], tags: list[TaggedRelation], cfg: ThresholdConfig
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Accepted triplets and images with at least one, per (rule, f"{eta:.2f}") over stats.ETAS and RULES: what
    threshold_batch would accept at that eta and rule, with the config's overlap filter and top-K (rows of the
    CLIP tagger are held to the swept eta too). Counts add up over batches, which hold disjoint images.

    A pair's survivors at eta are its rows with confidence >= eta (and overlapping boxes when the filter is on);
    top-K keeps min(K, survivors) of them, as threshold_batch keeps the K best of its survivors."""
    boxes = {(im.image_id, b.ann_id): b for im in images for b in im.boxes}
    triplets: dict[tuple[str, str], int] = {}
    kept: dict[tuple[str, str], int] = {}
    for rule in rules.RULES:
        by_pair: dict[tuple[int, int, int], list[float]] = defaultdict(list)
        for t in tags:
            pair = (t.image_id, t.subject_ann_id, t.object_ann_id)
            if cfg.overlap_filter and not rules.boxes_overlap(
                boxes[(t.image_id, t.subject_ann_id)], boxes[(t.image_id, t.object_ann_id)]
            ):
                continue
            conf = confidence(t, rule)
            if conf == conf:  # NaN never passes
                by_pair[pair].append(conf)
        for confs in by_pair.values():
            confs.sort()
        for eta in ETAS:
            n_rows = 0
            with_rows = set()
            for (image_id, _, _), confs in by_pair.items():
                n = len(confs) - bisect.bisect_left(confs, eta)  # rows with conf >= eta
                if cfg.top_k is not None:
                    n = min(n, cfg.top_k)
                n_rows += n
                if n:
                    with_rows.add(image_id)
            triplets[(rule, f"{eta:.2f}")] = n_rows
            kept[(rule, f"{eta:.2f}")] = len(with_rows)
    return triplets, kept


# -- the stage ---------------------------------------------------------------------------------------------


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
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


STAGE = register(
    Stage(
        "threshold", "tag", Triplet, "accepted", "threshold",
        settings=lambda cfg: cfg.threshold.model_dump(mode="json"),
        compute=_stage_batch,
        rejects=True,
        stats=("accepted", "reject_reasons"),
        funnel=(FunnelRow("accepted", "accepted triplets", "accepted", lambda s: s.tally("reject_reasons")),),
    )
)  # fmt: skip
