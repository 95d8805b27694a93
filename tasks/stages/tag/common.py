"""Tag stage: score every candidate (pair, relation text); the greedy overlap baseline lives here."""

from __future__ import annotations

from collections import defaultdict

from storage.records import Candidate, ImageRecord, TaggedRelation
from storage.rules import boxes_overlap
from tasks.stats import Count, Stats

GREEDY = "greedy_overlap"
#: TaggedRelation.tagger of the CLIP baseline (tasks/stages/tag/clip.py); the threshold stage cuts its rows at clip_eta
CLIP = "clip"


def tagged(
    c: Candidate,
    p_subject: float,
    p_object: float,
    p_relation: float,
    tagger: str,
    relation: str | None = None,
    relation_lemma: str | None = None,
) -> TaggedRelation:
    """A candidate with its three confidence factors; confidence = their product (paper Sec. 4.2.2), rank 0
    until rank_within_pairs. `relation` (and its lemma) replace the candidate's for a text of another pair
    (R-Tagger texts "all"), which then carries no caption provenance."""
    other = relation is not None and relation != c.relation
    return TaggedRelation(
        c.image_id, c.subject_ann_id, c.object_ann_id, c.subject_category_id, c.object_category_id,
        c.subject_label, c.object_label, relation if other else c.relation,
        relation_lemma if other else c.relation_lemma, [] if other else list(c.caption_ids),
        0 if other else c.n_captions, p_subject, p_object, p_relation, p_subject * p_object * p_relation, 0, tagger,
    )  # fmt: skip


def confidence_order(conf: float, n_captions: int, relation: str) -> tuple:
    """Sort key, best first: higher confidence, then more supporting captions, then text; NaN (not scored) last."""
    nan = conf != conf
    return (nan, 0.0 if nan else -conf, -n_captions, relation)


def rank_within_pairs(rows: list[TaggedRelation]) -> list[TaggedRelation]:
    """Set relation_rank: 1 for each pair's best relation (confidence, then support, then text)."""
    by_pair: dict[tuple[int, int, int], list[TaggedRelation]] = defaultdict(list)
    for r in rows:
        by_pair[(r.image_id, r.subject_ann_id, r.object_ann_id)].append(r)
    for group in by_pair.values():
        group.sort(key=lambda r: confidence_order(r.confidence, r.n_captions, r.relation))
        for k, r in enumerate(group, start=1):
            r.relation_rank = k
    return rows


def tag_greedy(images: list[ImageRecord], candidates: list[Candidate]) -> tuple[list[TaggedRelation], Stats]:
    """Paper Table 5, "greedy" with the overlap prior: every candidate relation whose classes match is assigned
    to the pair (p_subject = p_object = 1, matching is exact by construction); p_relation is 1 when the two
    boxes overlap and 0 otherwise, so the threshold keeps exactly the overlapping pairs.
    """
    boxes = {(im.image_id, b.ann_id): b for im in images for b in im.boxes}
    rows = []
    for c in candidates:
        try:
            sb, ob = boxes[(c.image_id, c.subject_ann_id)], boxes[(c.image_id, c.object_ann_id)]
        except KeyError as e:
            raise ValueError(
                f"candidate of image {c.image_id} refers to box {e.args[0][1]}, which the image does not have"
            ) from e
        p_rel = 1.0 if boxes_overlap(sb, ob) else 0.0
        rows.append(tagged(c, 1.0, 1.0, p_rel, GREEDY))
    rank_within_pairs(rows)
    pairs = {(r.image_id, r.subject_ann_id, r.object_ann_id) for r in rows}
    overlapping = {(r.image_id, r.subject_ann_id, r.object_ann_id) for r in rows if r.p_relation > 0}
    return rows, Stats(
        pairs=Count(len(pairs)),
        overlapping_pairs=Count(len(overlapping)),
        forwards=Count(0),
    )
