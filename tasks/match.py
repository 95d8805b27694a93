"""Match stage: parsed relations -> candidate (subject box, object box, relation text) rows, grouped for the R-Tagger."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from models.matcher import Match, Vocabulary
from storage.records import Candidate, ImageRecord, ParsedRelation
from tasks.config import MatchConfig

TOP_UNMATCHED = 25


@dataclass(slots=True)
class MatchOutput:
    candidates: list[Candidate]
    stats: dict = field(default_factory=dict)


@dataclass(slots=True)
class PairGroup:
    """At most n_q ordered box pairs of one image and the relation texts the R-Tagger scores them against."""

    image_id: int
    pairs: list[tuple[int, int]]  # (subject_ann_id, object_ann_id), <= n_q
    texts: list[str]  # distinct relation texts of the group's candidates, sorted
    pair_texts: list[list[int]]  # per pair, indices into texts of that pair's matched relation texts


@dataclass(slots=True)
class _Image:
    order: int
    record: ImageRecord
    box_index: dict[int, int]  # ann_id -> position in record.boxes
    boxes_by_class: dict[int, list]  # category id -> boxes in annotation order
    class_order: list[int]  # category ids in order of first box (the reference matcher's loop order)
    present: set[int]


def _index_images(images: list[ImageRecord]) -> dict[int, _Image]:
    out: dict[int, _Image] = {}
    for k, im in enumerate(images):
        if im.image_id in out:
            raise ValueError(f"image {im.image_id} appears twice in the match batch")
        box_index: dict[int, int] = {}
        by_class: dict[int, list] = {}
        for j, b in enumerate(im.boxes):
            if b.ann_id in box_index:
                raise ValueError(f"image {im.image_id} has two boxes with annotation id {b.ann_id}")
            box_index[b.ann_id] = j
            by_class.setdefault(b.category_id, []).append(b)
        out[im.image_id] = _Image(k, im, box_index, by_class, list(by_class), set(by_class))
    return out


def _match(vocab: Vocabulary, mode: str, text: str, head: str, img: _Image) -> tuple[Match | None, str]:
    """(match, reason): reason is "" when matched, else no_class / class_not_in_image (correct mode) or
    no_class_in_image (reference mode, which cannot tell the two apart)."""
    if mode == "reference":
        m = vocab.match_reference(text, img.class_order)
        return m, "" if m else "no_class_in_image"
    m = vocab.match(text, head, img.present)
    if m is not None:
        return m, ""
    return None, "no_class" if vocab.match(text, head, None) is None else "class_not_in_image"


def match_batch(
    images: list[ImageRecord], relations: list[ParsedRelation], cfg: MatchConfig, vocab: Vocabulary
) -> MatchOutput:
    """Candidates: every box of the subject's class x every box of the object's class, ordered, no self-pairs.

    One row per (image, subject box, object box, relation text); caption_ids are the sorted distinct captions
    that support it. Rules and synonyms come from the first supporting caption (lowest caption id). Rows are
    ordered by image (input order), subject box, object box (annotation order), relation text.

    Args:
        images: the batch's images with their boxes.
        relations: parsed relations of these images.
        cfg: mode "correct" (whole words, lemmas, head noun, longest match) or "reference" (the original
            substring, last-class-wins matcher).
        vocab: the dataset's vocabulary (Vocabulary.from_categories).
    """
    if vocab.synonyms_source != cfg.vocabulary:
        raise ValueError(
            f"MatchConfig.vocabulary is {cfg.vocabulary!r} but the vocabulary was built from {vocab.synonyms_source!r} lists"
        )
    idx = _index_images(images)
    # (image_id, subject ann, object ann, relation) -> [caption ids, first support key, first relation, matches]
    rows: dict[tuple[int, int, int, str], list] = {}
    reasons: Counter = Counter()
    unmatched_heads: Counter = Counter()
    rules: Counter = Counter()
    n_matched = 0
    for seq, r in enumerate(relations):
        img = idx.get(r.image_id)
        if img is None:
            raise ValueError(
                f"relation {seq} (caption {r.caption_id}, {r.subject_text!r} {r.relation!r} {r.object_text!r}) "
                f"names image {r.image_id}, which is not in this batch"
            )
        ms, why_s = _match(vocab, cfg.mode, r.subject_text, r.subject_head, img)
        mo, why_o = _match(vocab, cfg.mode, r.object_text, r.object_head, img)
        for m, why, head in ((ms, why_s, r.subject_head), (mo, why_o, r.object_head)):
            if m is None:
                reasons[why] += 1
                if why != "class_not_in_image":
                    unmatched_heads[" ".join(head.lower().split())] += 1
            else:
                rules[m.rule] += 1
        if ms is None or mo is None:
            continue
        n_matched += 1
        support = (r.caption_id, seq)
        for sb in img.boxes_by_class[ms.category_id]:
            for ob in img.boxes_by_class[mo.category_id]:
                if sb.ann_id == ob.ann_id:
                    continue  # no self-pairs; same-class pairs use distinct boxes
                key = (r.image_id, sb.ann_id, ob.ann_id, r.relation)
                row = rows.get(key)
                if row is None:
                    rows[key] = [{r.caption_id}, support, r, ms, mo, sb, ob]
                else:
                    row[0].add(r.caption_id)
                    if support < row[1]:
                        row[1:5] = [support, r, ms, mo]

    def order(key):
        img = idx[key[0]]
        return (img.order, img.box_index[key[1]], img.box_index[key[2]], key[3])

    candidates = []
    for key in sorted(rows, key=order):
        cids, _, r, ms, mo, sb, ob = rows[key]
        caption_ids = sorted(cids)
        candidates.append(
            Candidate(
                image_id=key[0],
                subject_ann_id=sb.ann_id,
                object_ann_id=ob.ann_id,
                subject_category_id=sb.category_id,
                object_category_id=ob.category_id,
                subject_label=sb.label,
                object_label=ob.label,
                relation=r.relation,
                relation_lemma=r.relation_lemma,
                caption_ids=caption_ids,
                n_captions=len(caption_ids),
                subject_rule=ms.rule,
                subject_synonym=ms.synonym,
                object_rule=mo.rule,
                object_synonym=mo.synonym,
            )
        )
    n_rel = len(relations)
    stats = {
        "mode": cfg.mode,
        "vocabulary": vocab.synonyms_source,
        "images": len(images),
        "images_with_candidates": len({c.image_id for c in candidates}),
        "relations": n_rel,
        "relations_matched": n_matched,
        "match_rate": round(n_matched / n_rel, 4) if n_rel else 0.0,
        "entity_rules": dict(sorted(rules.items())),
        "entity_unmatched": dict(sorted(reasons.items())),
        # head nouns that named no class at all (correct mode) / no class of the image (reference mode)
        "top_unmatched_heads": [
            [h, n] for h, n in sorted(unmatched_heads.items(), key=lambda x: (-x[1], x[0]))
        ][:TOP_UNMATCHED],
        "candidates": len(candidates),
        "pairs": len({(c.image_id, c.subject_ann_id, c.object_ann_id) for c in candidates}),
    }
    return MatchOutput(candidates, stats)


def group_candidates(candidates: list[Candidate], n_q: int) -> list[PairGroup]:
    """Per image, its distinct pairs (in candidate order) in groups of at most n_q; never an empty group.

    The reference emitted a trailing empty group when an image had a multiple of 100 pairs; here the number
    of groups is ceil(pairs / n_q).
    """
    if not isinstance(n_q, int) or n_q < 1:
        raise ValueError(f"n_q must be a positive int, got {n_q!r}")
    per_image: dict[int, dict[tuple[int, int], set[str]]] = {}
    for c in candidates:
        pairs = per_image.setdefault(c.image_id, {})
        pairs.setdefault((c.subject_ann_id, c.object_ann_id), set()).add(c.relation)
    groups: list[PairGroup] = []
    for image_id, pairs in per_image.items():
        items = list(pairs.items())
        for i in range(0, len(items), n_q):
            chunk = items[i : i + n_q]
            texts = sorted(set().union(*(t for _, t in chunk)))
            pos = {t: k for k, t in enumerate(texts)}
            groups.append(
                PairGroup(
                    image_id=image_id,
                    pairs=[p for p, _ in chunk],
                    texts=texts,
                    pair_texts=[sorted(pos[t] for t in ts) for _, ts in chunk],
                )
            )
    return groups
