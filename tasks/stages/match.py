"""Match stage: parsed relations -> candidate (subject box, object box, relation text) rows, grouped for the R-Tagger."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from models.matcher import Match, Vocabulary, extensions_sha256, partitive_kind, words
from storage.records import Candidate, Caption, ImageRecord, ParsedRelation
from tasks.config import MatchConfig, PipelineConfig
from tasks.run.context import RunContext, batch_images, read_stage, run_vocabulary
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.stats import NOUN_EXAMPLES, Count, Examples, Group, Label, Ratio, Stats, Tally

TOP_UNMATCHED = 25


@dataclass(slots=True)
class MatchOutput:
    candidates: list[Candidate]
    stats: Stats = field(default_factory=Stats)


@dataclass(slots=True)
class PairGroup:
    """At most n_q ordered box pairs of one image and the relation texts the R-Tagger scores them against."""

    image_id: int
    pairs: list[tuple[int, int]]  # (subject_ann_id, object_ann_id), <= n_q
    texts: list[str]  # distinct relation texts of the group's candidates, sorted
    pair_texts: list[list[int]]  # per pair, indices into texts of that pair's matched relation texts


@dataclass(slots=True)
class SlotGroup:
    """One R-Tagger forward's worth of (pair, text) slots of one image, as the reference groups them."""

    image_id: int
    slots: list[tuple[int, int]]  # (subject_ann_id, object_ann_id) per slot; a pair repeats once per text
    slot_text: list[int]  # per slot, the index of its relation text in `texts`
    texts: list[str]  # the group's relation texts, first-seen order


@dataclass(slots=True)
class _Image:
    order: int
    record: ImageRecord
    box_index: dict[int, int]  # ann_id -> the box's rank in candidate order (see _index_images)
    boxes_by_class: dict[int, list]  # category id -> boxes in that order
    class_order: list[int]  # the reference matcher's loop order over the image's classes
    present: set[int]


def _index_images(images: list[ImageRecord], mode: str) -> dict[int, _Image]:
    """Boxes and classes of each image in the order the mode needs.

    correct: boxes in record order (annotation ids); classes by first box. reference: boxes in the order of
    the detection file (the reference's CocoDetection loads an image's annotations in file order and indexes
    pairs by position in that list) and classes in the record's `class_order` (the reference's
    `bboxes_names`: every annotation of the image in file order, crowd and empty ones included, so a class
    without a usable box still takes part in last-class-wins but never in a pair).
    """
    out: dict[int, _Image] = {}
    for k, im in enumerate(images):
        if im.image_id in out:
            raise ValueError(f"image {im.image_id} appears twice in the match batch")
        boxes = im.boxes
        class_order = None
        if mode == "reference":
            if im.box_file_index is None or im.class_order is None:
                raise ValueError(
                    f"match.mode 'reference' needs image {im.image_id}'s annotation-file order "
                    "(box_file_index, class_order), which its record lacks: plan the run with this reltag "
                    "(records planned before it did not store the file order)"
                )
            if len(im.box_file_index) != len(boxes):
                raise ValueError(
                    f"image {im.image_id} has {len(boxes)} boxes but {len(im.box_file_index)} box_file_index "
                    "entries"
                )
            missing = sorted({b.category_id for b in boxes} - set(im.class_order))
            if missing:
                raise ValueError(
                    f"image {im.image_id}: box categories {missing} are not in its class_order {im.class_order}"
                )
            order = sorted(range(len(boxes)), key=lambda j: im.box_file_index[j])
            boxes = [boxes[j] for j in order]
            class_order = list(dict.fromkeys(im.class_order))
        box_index: dict[int, int] = {}
        by_class: dict[int, list] = {}
        for j, b in enumerate(boxes):
            if b.ann_id in box_index:
                raise ValueError(f"image {im.image_id} has two boxes with annotation id {b.ann_id}")
            box_index[b.ann_id] = j
            by_class.setdefault(b.category_id, []).append(b)
        if class_order is None:
            class_order = list(by_class)
        out[im.image_id] = _Image(k, im, box_index, by_class, class_order, set(by_class))
    return out


def _match(
    vocab: Vocabulary, mode: str, text: str, head: str, img: _Image, of_complement: bool = False
) -> tuple[Match | None, str]:
    """(match, reason): reason is "" when matched, else no_class / class_not_in_image (correct mode) or
    no_class_in_image (reference mode, which cannot tell the two apart)."""
    if mode == "reference":
        m = vocab.match_reference(text, img.class_order)
        return m, "" if m else "no_class_in_image"
    m = vocab.match(text, head, img.present, of_complement)
    if m is not None:
        return m, ""
    return None, "no_class" if vocab.match(text, head, None, of_complement) is None else "class_not_in_image"


def _is_of(r: ParsedRelation) -> bool:
    return words(r.relation) == ["of"]


@dataclass(slots=True)
class _Complements:
    """Per caption entity (image, caption, span), the entities its "of" relations point at: "A group" -of->
    "sheep". A partitive head with exactly one distinct complement is matched by it (correct mode)."""

    of: dict[tuple[int, int, str], set[tuple[str, str]]]

    @classmethod
    def of_relations(cls, relations: list[ParsedRelation]) -> _Complements:
        of: dict[tuple[int, int, str], set[tuple[str, str]]] = {}
        for r in relations:
            if _is_of(r):
                of.setdefault((r.image_id, r.caption_id, r.subject_text), set()).add(
                    (r.object_text, r.object_head)
                )
        return cls(of)

    def has(self, r: ParsedRelation, text: str) -> bool:
        return (r.image_id, r.caption_id, text) in self.of

    def resolve(self, r: ParsedRelation, text: str, head: str) -> tuple[str, str, str]:
        """(text, head, partitive word) to match: the complement of a partitive head, else the entity itself
        (partitive word "")."""
        if partitive_kind(head):
            comp = self.of.get((r.image_id, r.caption_id, text), set())
            if len(comp) == 1:
                ((ctext, chead),) = comp
                return ctext, chead, words(head)[-1]
        return text, head, ""


def match_batch(
    images: list[ImageRecord],
    relations: list[ParsedRelation],
    cfg: MatchConfig,
    vocab: Vocabulary,
    caption_texts: Mapping[tuple[int, int], str] | None = None,
) -> MatchOutput:
    """Candidates: every box of the subject's class x every box of the object's class, ordered, no self-pairs.

    One row per (image, subject box, object box, relation text); caption_ids are the sorted distinct captions
    that support it. Rules and synonyms come from the first supporting caption (lowest caption id).

    Order. correct: by image (input order), subject box, object box (annotation-id order), relation text.
    reference: the reference's order (BLIP_o365_caption_helper.transform_BLIP_sngs_to_verb_tagger_input_format),
    by image, subject box, object box in annotation-file order (its `permutations(range(num_obj), 2)` over the
    image's non-crowd boxes, clamped to the image, empty ones dropped), then relation text in the first-seen
    order of its (subject class, relation, object class) triplet over the image's captions (caption id, then
    the relations' input order within a caption, which is the parser's). In that mode the classes whose boxes
    were all dropped (crowd, empty) still win entities by last-class-wins, as in the reference, and give no
    pairs. Planning with box_policy "quarantine" would leave out boxes that the reference clamps and keeps.

    Args:
        images: the batch's images with their boxes.
        relations: parsed relations of these images.
        cfg: mode "correct" (whole words, lemmas, head noun, longest match) or "reference" (the original
            substring, last-class-wins matcher).
        vocab: the dataset's vocabulary (Vocabulary.from_categories).
        caption_texts: (image_id, caption_id) -> caption text, for the example captions of unmatched head
            nouns in the stats (none kept without it).
    """
    if vocab.synonyms_source != cfg.vocabulary:
        raise ValueError(
            f"MatchConfig.vocabulary is {cfg.vocabulary!r} but the vocabulary was built from {vocab.synonyms_source!r} lists"
        )
    if vocab.extensions and not (cfg.mode == "correct" and cfg.extensions):
        raise ValueError(
            f"the vocabulary carries synonym extensions but match.mode is {cfg.mode!r} with extensions "
            f"{cfg.extensions}: the extensions are for the correct mode with match.extensions on"
        )
    correct = cfg.mode == "correct"
    comps = _Complements.of_relations(relations) if correct else _Complements({})
    idx = _index_images(images, cfg.mode)
    # (image_id, subject ann, object ann, relation) -> [caption ids, first support key, first relation, matches]
    rows: dict[tuple[int, int, int, str], list] = {}
    reasons: Counter = Counter()
    unmatched_heads: Counter = Counter()
    examples: dict[str, set] = {}  # head noun -> {((image_id, caption_id), caption text)}
    relations_unmatched: Counter = Counter()  # per relation: the first unmatched side and its reason
    rules: Counter = Counter()
    partitives_used: Counter = Counter()  # partitive word -> entities matched through its complement
    n_matched = 0
    n_without_pairs = 0
    for seq, r in enumerate(relations):
        img = idx.get(r.image_id)
        if img is None:
            raise ValueError(
                f"relation {seq} (caption {r.caption_id}, {r.subject_text!r} {r.relation!r} {r.object_text!r}) "
                f"names image {r.image_id}, which is not in this batch"
            )
        if correct and cfg.partitives and _is_of(r) and partitive_kind(r.subject_head):
            # "a group" -of-> "sheep" is how the group is made of sheep, not a relation between two things
            relations_unmatched["partitive_link"] += 1
            continue
        sides = []
        for text, head in ((r.subject_text, r.subject_head), (r.object_text, r.object_head)):
            part = ""
            if correct and cfg.partitives:
                text, head, part = comps.resolve(r, text, head)
            m, why = _match(vocab, cfg.mode, text, head, img, correct and comps.has(r, text))
            if m is not None and part:
                partitives_used[part] += 1
            sides.append((m, why, head))
        (ms, why_s, _), (mo, why_o, _) = sides
        for m, why, head in sides:
            if m is None:
                reasons[why] += 1
                if why != "class_not_in_image":
                    noun = " ".join(head.lower().split())
                    unmatched_heads[noun] += 1
                    if caption_texts is not None:
                        key = (r.image_id, r.caption_id)
                        examples.setdefault(noun, set()).add((key, caption_texts.get(key, "")))
            else:
                rules[m.rule] += 1
        if ms is None or mo is None:
            relations_unmatched[
                "no_match_either" if ms is None and mo is None else "no_subject_match" if ms is None
                else "no_object_match"
            ] += 1  # fmt: skip
            continue
        n_matched += 1
        paired = False
        support = (r.caption_id, seq)
        # reference mode can match a class with no box (crowd / empty only): it gives no pair
        for sb in img.boxes_by_class.get(ms.category_id, ()):
            for ob in img.boxes_by_class.get(mo.category_id, ()):
                if sb.ann_id == ob.ann_id:
                    continue  # no self-pairs; same-class pairs use distinct boxes
                paired = True
                key = (r.image_id, sb.ann_id, ob.ann_id, r.relation)
                row = rows.get(key)
                if row is None:
                    rows[key] = [{r.caption_id}, support, r, ms, mo, sb, ob]
                else:
                    row[0].add(r.caption_id)
                    if support < row[1]:
                        row[1:5] = [support, r, ms, mo]
        n_without_pairs += not paired

    def order(key):
        img = idx[key[0]]
        # reference: texts of a pair in the first-seen order of their triplet, i.e. of their first support
        last = rows[key][1] if cfg.mode == "reference" else key[3]
        return (img.order, img.box_index[key[1]], img.box_index[key[2]], last)

    candidates = []
    extension_use: Counter = Counter()  # "phrase -> class": candidates whose subject or object it matched
    for key in sorted(rows, key=order):
        cids, _, r, ms, mo, sb, ob = rows[key]
        caption_ids = sorted(cids)
        for m in {(ms.synonym, ms.label) if ms.rule == "extension" else None,
                  (mo.synonym, mo.label) if mo.rule == "extension" else None} - {None}:  # fmt: skip
            extension_use[f"{m[0]} -> {m[1]}"] += 1
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
    stats = Stats(
        mode=Label.of(cfg.mode),
        vocabulary=Label.of(vocab.synonyms_source),
        images=Count(len(images)),
        images_with_candidates=Count(len({c.image_id for c in candidates})),
        relations=Count(len(relations)),
        relations_matched=Count(n_matched),
        match_rate=Ratio(n_matched, len(relations)),
        # parsed relations that became candidates (matched, with a distinct box pair)
        relations_with_candidates=Count(n_matched - n_without_pairs),
        yield_rate=Ratio(n_matched - n_without_pairs, len(relations)),
        # per relation lost in matching: no_subject_match / no_object_match / no_match_either, and (correct mode,
        # partitives on) partitive_link: "a group" -of-> "sheep", the link that resolves the group to sheep
        relations_unmatched=Tally(dict(relations_unmatched)),
        # partitive word -> entities matched through its "of" complement ("group" in "a group of sheep")
        partitive_matches=Tally(dict(partitives_used)),
        # extension phrase -> class: candidates it matched a subject or object of (what the extensions bought)
        extension_candidates=Tally(dict(extension_use), form="pairs"),
        # matched relations that gave no pair (e.g. "a man next to a man" with one person box)
        relations_without_pairs=Count(n_without_pairs),
        entity_rules=Tally(dict(rules)),
        entity_unmatched=Tally(dict(reasons)),
        # head nouns that named no class at all (correct mode) / no class of the image (reference mode); every
        # noun is kept and merged, the view shows the TOP_UNMATCHED most frequent
        top_unmatched_heads=Tally(dict(unmatched_heads), top=TOP_UNMATCHED, form="pairs"),
        # up to NOUN_EXAMPLES captions per noun, the first by (image_id, caption_id); in the run's audit only
        unmatched_examples=Group(
            {noun: Examples.of(ex, NOUN_EXAMPLES) for noun, ex in examples.items()}, hidden=True
        ),
        candidates=Count(len(candidates)),
        pairs=Count(len({(c.image_id, c.subject_ann_id, c.object_ann_id) for c in candidates})),
    )
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


def reference_slot_groups(candidates: list[Candidate], n_q: int = 100) -> list[SlotGroup]:
    """Reference grouping: (pair, text) entries in candidate order, up to n_q per group, per image.

    What the reference's candidate files hold per image (`rel_cand[image_id]`, a list of [pairs, texts]
    groups): the image's (pair, relation text) entries in order, cut every n_q entries (num_queries 200 // 2
    = 100), so a pair with three texts takes three slots, possibly split over two groups; each group's
    texts are its entries' texts, de-duplicated in first-seen order. Images come in order of their first
    candidate; an image's entries keep their relative order even when other images' candidates come between.
    With match.mode "reference" the candidates are in the reference's entry order.

    The reference builds len(entries) // n_q + 1 groups, so an image whose entry count is a multiple of n_q
    (or zero) ends with an empty group; an empty group gives the tagger no slot and no output, so none is
    made here.
    """
    if not isinstance(n_q, int) or isinstance(n_q, bool) or n_q < 1:
        raise ValueError(f"n_q must be a positive int, got {n_q!r}")
    per_image: dict[int, list[Candidate]] = {}
    for c in candidates:
        per_image.setdefault(c.image_id, []).append(c)
    groups: list[SlotGroup] = []
    for image_id, entries in per_image.items():
        for i in range(0, len(entries), n_q):
            chunk = entries[i : i + n_q]
            pos: dict[str, int] = {}
            slot_text = [pos.setdefault(c.relation, len(pos)) for c in chunk]
            groups.append(
                SlotGroup(
                    image_id=image_id,
                    slots=[(c.subject_ann_id, c.object_ann_id) for c in chunk],
                    slot_text=slot_text,
                    texts=list(pos),
                )
            )
    return groups


# -- the stage ---------------------------------------------------------------------------------------------


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    # caption texts, for the example captions of unmatched nouns in the stats
    texts = {(c.image_id, c.caption_id): c.text for c in read_stage(ctx, "caption", Caption, shard, batch)}
    out = match_batch(
        batch_images(ctx, shard, batch),
        read_stage(ctx, "parse", ParsedRelation, shard, batch),
        ctx.config.match,
        run_vocabulary(ctx),
        texts,
    )
    return StageOutput(out.candidates, stats=out.stats)


def _revision(cfg: PipelineConfig, inputs: dict) -> str:
    """The extension file's checksum when the run matches with it: editing the file re-keys the stage."""
    m = cfg.match
    if m.mode == "correct" and m.extensions:
        return "extensions:" + extensions_sha256(m.vocabulary)[:16]
    return ""


STAGE = register(
    Stage(
        "match", "parse", Candidate, "candidates", "match",
        settings=lambda cfg: cfg.match.key_settings(),
        revision=_revision,
        compute=_stage_batch,
        stats=("relations_matched", "relations_unmatched", "pairs", "relations_without_pairs"),
        funnel=(
            FunnelRow("matched", "relations matched to boxes", "relations_matched",
                      lambda s: s.tally("relations_unmatched")),
            FunnelRow("candidate_pairs", "candidate pairs", "pairs",
                      lambda s: {"no_distinct_box_pair": s.count("relations_without_pairs")}),
        ),
    )
)  # fmt: skip
