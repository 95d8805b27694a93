"""Threshold stage: keep tagged relations with confidence >= eta, the rest become rejects with the reason."""

from __future__ import annotations

from collections import Counter

from storage.records import ImageRecord, Reject, TaggedRelation, Triplet
from tasks.config import ThresholdConfig


def confidence(row: TaggedRelation, rule: str) -> float:
    """The paper's rule (Sec. 4.2.2): p_subject * p_object * p_relation; the reference code's: p_relation."""
    if rule == "paper":
        return row.p_subject * row.p_object * row.p_relation
    if rule == "relation_only":
        return row.p_relation
    raise ValueError(f"unknown confidence rule {rule!r}; expected 'paper' or 'relation_only'")


def threshold_batch(
    images: list[ImageRecord], tags: list[TaggedRelation], cfg: ThresholdConfig, run_key: str
) -> tuple[list[Triplet], list[Reject], dict]:
    """Split tagged relations into accepted triplets (with boxes and provenance) and rejects."""
    boxes = {(im.image_id, b.ann_id): b for im in images for b in im.boxes}
    accepted, rejects = [], []
    reasons: Counter = Counter()
    for t in tags:
        conf = confidence(t, cfg.rule)
        if not conf >= cfg.eta:  # also rejects NaN
            reason = "nan_confidence" if conf != conf else "below_eta"
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
    stats = {
        "accepted": len(accepted),
        "rejected": len(rejects),
        **{f"rejected_{k}": v for k, v in reasons.items()},
    }
    if accepted:
        stats["top_relations"] = dict(Counter(a.relation for a in accepted).most_common(50))
    return accepted, rejects, stats
