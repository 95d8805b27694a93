"""Matching: golden cases for both modes (every substring trap), vocabulary loading, candidates and grouping."""

from __future__ import annotations

import json
import random
from importlib import resources

import pytest

from models.matcher import Vocabulary, words
from storage.records import Box, Candidate, ImageRecord, ParsedRelation
from tasks.config import MatchConfig
from tasks.stages.match import PairGroup, group_candidates, match_batch

# Objects365 ids used below
PERSON, CHAIR, HAT, CABINET, HANDBAG, CAR, BENCH, DOG, KNIFE, MOUSE, STUFFED_TOY = (
    1,
    3,
    5,
    13,
    14,
    46,
    25,
    None,
    85,
    116,
    71,
)


@pytest.fixture(scope="module")
def o365():
    return Vocabulary.load("o365")


@pytest.fixture(scope="module")
def coco():
    return Vocabulary.load("coco")


def _ids(v: Vocabulary, *labels: str) -> list[int]:
    by = {c.label.strip().lower(): c.category_id for c in v.classes}
    return [by[x.lower()] for x in labels]


# (entity text, head, classes in the image in box order) -> correct-mode label, rule, synonym | reference label
# Objects365 vocabulary.
GOLDEN_O365 = [
    # "hair" (a person synonym) inside "chair"
    ("a chair", "chair", ["Person", "Chair"], ("Chair", "name", "chair"), "Chair"),
    ("a chair", "chair", ["Chair", "Person"], ("Chair", "name", "chair"), "Person"),
    ("a chair", "chair", ["Person"], None, "Person"),
    # "hand" inside "handbag"
    ("a handbag", "handbag", ["Handbag/Satchel", "Person"], ("Handbag/Satchel", "name", "handbag"), "Person"),
    ("a handbag", "handbag", ["Person"], None, "Person"),
    # "car" inside "carrot"
    ("a carrot", "carrot", ["Carrot", "Car"], ("Carrot", "name", "carrot"), "Car"),
    ("a carrot", "carrot", ["Car"], None, "Car"),
    # "bear" inside "teddy bear": the longest phrase wins
    ("a teddy bear", "bear", ["Stuffed Toy", "Bear"], ("Stuffed Toy", "synonym", "teddy bear"), "Bear"),
    # ...but the Objects365 list of Bear itself lists "teddy bear", so with only a Bear annotated the list
    # decides (a phrase listed for several classes picks among those present); COCO below has no such entry
    ("a teddy bear", "bear", ["Bear"], ("Bear", "synonym", "teddy bear"), "Bear"),
    ("a teddy bear", "bear", ["Person"], None, None),
    # plural / irregular forms are not listed; whole-word lemma matching finds them
    ("two men", "men", ["Person"], ("Person", "lemma", "man"), None),
    ("three women", "women", ["Person"], ("Person", "lemma", "woman"), None),
    ("the people", "people", ["Person"], ("Person", "synonym", "people"), "Person"),
    ("two knives", "knives", ["Knife"], ("Knife", "lemma", "knife"), None),
    ("some shelves", "shelves", ["Cabinet/shelf"], ("Cabinet/shelf", "lemma", "shelf"), None),
    ("three mice", "mice", ["Mouse"], ("Mouse", "synonym", "mice"), "Mouse"),
    ("two chairs", "chairs", ["Chair"], ("Chair", "lemma", "chair"), "Chair"),
    ("two benches", "benches", ["Bench"], ("Bench", "lemma", "bench"), "Bench"),
    # the entity is its head noun: in "a man's hat" the hat
    ("a man's hat", "hat", ["Person", "Hat"], ("Hat", "name", "hat"), "Hat"),
    ("a man's hat", "hat", ["Hat", "Person"], ("Hat", "name", "hat"), "Person"),
    ("a man's hat", "hat", ["Person"], None, "Person"),
    # multi-word synonyms
    (
        "a pair of tennis shoes",
        "tennis shoes",
        ["Sneakers"],
        ("Sneakers", "synonym", "tennis shoes"),
        "Sneakers",
    ),
    (
        "a traffic light",
        "traffic light",
        ["Traffic Light"],
        ("Traffic Light", "name", "traffic light"),
        "Traffic Light",
    ),
    (
        "some red traffic lights",
        "traffic lights",
        ["Traffic Light"],
        ("Traffic Light", "lemma", "traffic light"),
        "Traffic Light",
    ),
    # only classes present in the image count
    ("a man", "man", ["Chair"], None, None),
    ("a man", "man", ["Person"], ("Person", "synonym", "man"), "Person"),
    # "Cabinet/shelf" matches by either of its names
    ("a cabinet", "cabinet", ["Cabinet/shelf"], ("Cabinet/shelf", "name", "cabinet"), "Cabinet/shelf"),
]

GOLDEN_COCO = [
    # "dog" inside "hot dog"
    ("a hot dog", "dog", ["dog"], None, "dog"),
    ("a hot dog", "dog", ["hot dog", "dog"], ("hot dog", "name", "hot dog"), "dog"),
    ("a dog", "dog", ["hot dog", "dog"], ("dog", "name", "dog"), "dog"),
    # "cycle" (a bicycle synonym) inside "motorcycle"
    (
        "a motorcycle",
        "motorcycle",
        ["motorcycle", "bicycle"],
        ("motorcycle", "name", "motorcycle"),
        "bicycle",
    ),
    ("a motorcycle", "motorcycle", ["bicycle"], None, "bicycle"),
    ("a chair", "chair", ["person", "chair"], ("chair", "name", "chair"), "chair"),
    ("a chair", "chair", ["chair", "person"], ("chair", "name", "chair"), "person"),
    ("a carrot", "carrot", ["carrot", "car"], ("carrot", "name", "carrot"), "car"),
    ("two men", "men", ["person"], ("person", "lemma", "man"), None),
    ("a teddy bear", "bear", ["bear", "teddy bear"], ("teddy bear", "name", "teddy bear"), "teddy bear"),
    ("a teddy bear", "bear", ["teddy bear", "bear"], ("teddy bear", "name", "teddy bear"), "bear"),
]


def _check(v, text, head, labels, want, want_ref):
    present = _ids(v, *labels)
    m = v.match(text, head, set(present))
    got = None if m is None else (m.label, m.rule, m.synonym)
    assert got == want, (text, labels, got)
    r = v.match_reference(text, present)
    assert (None if r is None else r.label) == want_ref, (text, labels, r)
    if r is not None:
        assert r.rule == "reference" and r.synonym in text


@pytest.mark.parametrize("text,head,labels,want,want_ref", GOLDEN_O365)
def test_golden_o365(o365, text, head, labels, want, want_ref):
    _check(o365, text, head, labels, want, want_ref)


@pytest.mark.parametrize("text,head,labels,want,want_ref", GOLDEN_COCO)
def test_golden_coco(coco, text, head, labels, want, want_ref):
    _check(coco, text, head, labels, want, want_ref)


def test_reference_lower_cases_spans_like_the_original(o365):
    # the original lower-cased every entity span (grammartical_tranform) before the substring test
    chair_person = _ids(o365, "Chair", "Person")
    assert o365.match_reference("A CHAIR", chair_person).label == "Person"
    assert o365.match("A CHAIR", "CHAIR", set(chair_person)).label == "Chair"


def test_match_without_image_restriction_and_spans(o365):
    m = o365.match("a man's hat", "hat")
    assert (m.label, m.start, m.end) == ("Hat", 3, 4)
    assert words("a man's hat") == ["a", "man", "s", "hat"]
    assert o365.match("", "") is None
    assert o365.match("a blorft", "blorft") is None
    # without a head the last word is the head
    assert o365.match("a hot dog").label == "Hot dog"


def test_tie_rule_prefers_name_then_lowest_id():
    v = Vocabulary.from_categories(
        [{"id": 7, "name": "Seat"}, {"id": 3, "name": "Stool"}, {"id": 9, "name": "Bench"}], "coco"
    )
    # none of these is a COCO class, so they only match by their own names
    assert v.match("a stool", "stool").label == "Stool"
    # a phrase listed for two classes: name rule beats nothing; equal rules -> lowest category id
    v2 = Vocabulary.from_categories(
        [{"id": 5, "name": "Couch/Sofa"}, {"id": 2, "name": "Sofa/Settee"}], "coco"
    )
    m = v2.match("a sofa", "sofa")
    assert (m.category_id, m.rule) == (2, "name")
    assert v2.match("a sofa", "sofa", {5}).category_id == 5


def test_from_categories_o365_keys_in_id_order(o365):
    raw = json.loads(resources.files("models.data.synonyms").joinpath("o365_categories.json").read_text())
    assert len(o365.classes) == 365 and len(raw) == 365
    basket = o365.by_id[53]
    assert basket.label == "Bakset" and basket.key == "basket" and "basket" in basket.names
    assert o365.match("a basket", "basket").category_id == 53
    assert o365.by_id[13].names == ("cabinet", "shelf")
    # a category whose name is not an official one keeps its own names
    v = Vocabulary.from_categories([{"id": 1, "name": "Person"}, {"id": 999, "name": "Gizmo/Widget"}], "o365")
    assert v.by_id[999].synonyms == () and v.by_id[999].names == ("gizmo", "widget")
    assert v.match("two widgets", "widgets").rule == "lemma"
    assert v.match("a gizmo", "gizmo").rule == "name"
    assert v.by_id[1].key == "person" and "man" in v.by_id[1].synonyms


def test_from_categories_coco_by_name(coco):
    assert len(coco.classes) == 80
    v = Vocabulary.from_categories([{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}], "coco")
    assert v.match("an automobile", "automobile").label == "car"
    assert v.by_id[18].key == "dog"


@pytest.mark.parametrize(
    "cats,synonyms,msg",
    [
        ([{"id": 1}], "o365", "needs 'id' and 'name'"),
        ([{"id": "1", "name": "x"}], "coco", "has id '1'"),
        ([{"id": 1, "name": "  "}], "coco", "non-empty name"),
        ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "coco", r"duplicate category ids \[1\]"),
        ([{"id": 1, "name": "a"}], "vg", "synonyms must be 'o365' or 'coco', got 'vg'"),
    ],
)
def test_from_categories_rejects(cats, synonyms, msg):
    with pytest.raises(ValueError, match=msg):
        Vocabulary.from_categories(cats, synonyms)


# ---- match_batch ------------------------------------------------------------------------------------------


def _img(image_id, boxes):
    # as if the file listed the boxes in this order and had no other annotation (reference mode reads both)
    return ImageRecord(
        image_id,
        f"{image_id}.jpg",
        640,
        480,
        0,
        [Box(a, c, lab, 0, 0, 10, 10) for a, c, lab in boxes],
        box_file_index=list(range(len(boxes))),
        class_order=list(dict.fromkeys(c for _, c, _ in boxes)),
    )


def _rel(image_id, cid, s, rel, o, s_head=None, o_head=None):
    return ParsedRelation(
        image_id, cid, s, s_head or s.split()[-1], rel, rel + "_lemma", o, o_head or o.split()[-1]
    )


@pytest.fixture()
def scene():
    # image 1: two people, a chair, a handbag; image 2: one person, one bench
    im1 = _img(1, [(10, 1, "Person"), (11, 3, "Chair"), (12, 1, "Person"), (13, 14, "Handbag")])
    im2 = _img(2, [(20, 25, "Bench"), (21, 1, "Person")])
    rels = [
        _rel(1, 0, "a man", "sitting on", "a chair"),
        _rel(1, 3, "a man", "sitting on", "a chair"),
        _rel(1, 3, "two men", "sitting on", "a chair"),  # same caption again -> caption id listed once
        _rel(1, 1, "a woman", "holding", "a handbag"),
        _rel(1, 2, "a person", "next to", "a person"),  # same class: distinct boxes only
        _rel(1, 4, "a hot dog", "on", "a chair", "dog"),  # no dog here, and hot dog is not a dog
        _rel(2, 0, "a man", "sitting on", "a bench"),
        _rel(2, 1, "a man", "next to", "a man"),  # one person box: no self-pair
    ]
    return [im1, im2], rels


def _rows(cands):
    return [
        (c.image_id, c.subject_ann_id, c.object_ann_id, c.relation, c.caption_ids, c.n_captions)
        for c in cands
    ]


def test_candidates_correct_mode(o365, scene):
    images, rels = scene
    out = match_batch(images, rels, MatchConfig(), o365)
    assert _rows(out.candidates) == [
        (1, 10, 11, "sitting on", [0, 3], 2),
        (1, 10, 12, "next to", [2], 1),
        (1, 10, 13, "holding", [1], 1),
        (1, 12, 10, "next to", [2], 1),
        (1, 12, 11, "sitting on", [0, 3], 2),
        (1, 12, 13, "holding", [1], 1),
        (2, 21, 20, "sitting on", [0], 1),
    ]
    c = out.candidates[0]
    assert (c.subject_label, c.object_label, c.subject_category_id, c.object_category_id) == (
        "Person",
        "Chair",
        1,
        3,
    )
    assert (c.subject_rule, c.subject_synonym, c.object_rule, c.object_synonym) == (
        "synonym",
        "man",
        "name",
        "chair",
    )
    assert c.relation_lemma == "sitting on_lemma"
    assert all(c.subject_ann_id != c.object_ann_id for c in out.candidates)
    s = out.stats
    # 7 of 8 match ("a man next to a man" in image 2 matches but has one person box, so no pair)
    assert s["relations"] == 8 and s["relations_matched"] == 7 and s["match_rate"] == 0.875
    assert s["candidates"] == 7 and s["pairs"] == 7 and s["images_with_candidates"] == 2
    assert s["entity_unmatched"] == {"class_not_in_image": 1}  # the hot dog: a class, not in this image
    assert s["top_unmatched_heads"] == []


def test_candidates_reference_mode(o365, scene):
    images, rels = scene
    out = match_batch(images, rels, MatchConfig(mode="reference"), o365)
    rows = _rows(out.candidates)
    # "two men" matches nothing by substring; "a hot dog" matches nothing here either; "a chair" and
    # "a handbag" hit Person through "hair"/"hand", but a later class in box order wins (Chair, Handbag)
    assert (1, 10, 11, "sitting on", [0, 3], 2) in rows
    assert all(c.subject_rule == "reference" for c in out.candidates)
    assert out.stats["relations_matched"] == 6  # all but "two men" and "a hot dog"


def test_reference_last_class_wins_in_batch(o365):
    # box order puts Chair before Person, so "a chair" ends on Person through "hair": a person-person pair
    im = _img(5, [(50, 3, "Chair"), (51, 1, "Person"), (52, 1, "Person")])
    rels = [_rel(5, 0, "a man", "sitting on", "a chair")]
    ref = match_batch([im], rels, MatchConfig(mode="reference"), o365)
    assert _rows(ref.candidates) == [(5, 51, 52, "sitting on", [0], 1), (5, 52, 51, "sitting on", [0], 1)]
    ok = match_batch([im], rels, MatchConfig(), o365)
    assert _rows(ok.candidates) == [(5, 51, 50, "sitting on", [0], 1), (5, 52, 50, "sitting on", [0], 1)]


def test_candidates_deterministic_under_shuffle(o365, scene):
    images, rels = scene
    want = match_batch(images, rels, MatchConfig(), o365).candidates
    rng = random.Random(0)
    for _ in range(5):
        shuffled = rels[:]
        rng.shuffle(shuffled)
        assert match_batch(images, shuffled, MatchConfig(), o365).candidates == want


def test_unmatched_heads_counted(o365):
    im = _img(3, [(30, 1, "Person")])
    rels = [
        _rel(3, 0, "a man", "holding", "a blorft"),
        _rel(3, 1, "a woman", "holding", "a blorft"),
        _rel(3, 2, "a man", "near", "a zorp"),
    ]
    out = match_batch([im], rels, MatchConfig(), o365)
    assert out.candidates == []
    assert out.stats["top_unmatched_heads"] == [["blorft", 2], ["zorp", 1]]
    assert out.stats["entity_unmatched"] == {"no_class": 3}
    assert out.stats["match_rate"] == 0.0


def test_match_batch_rejects(o365):
    im = _img(1, [(10, 1, "Person")])
    with pytest.raises(ValueError, match="names image 99, which is not in this batch"):
        match_batch([im], [_rel(99, 0, "a man", "on", "a man")], MatchConfig(), o365)
    with pytest.raises(ValueError, match="image 1 appears twice"):
        match_batch([im, im], [], MatchConfig(), o365)
    with pytest.raises(ValueError, match="image 4 has two boxes with annotation id 7"):
        match_batch([_img(4, [(7, 1, "Person"), (7, 3, "Chair")])], [], MatchConfig(), o365)
    with pytest.raises(
        ValueError, match="MatchConfig.vocabulary is 'coco' but the vocabulary was built from 'o365'"
    ):
        match_batch([im], [], MatchConfig(vocabulary="coco"), o365)


# ---- grouping ---------------------------------------------------------------------------------------------


def _cands(image_id, n_pairs, texts_per_pair=1):
    out = []
    for k in range(n_pairs):
        for t in range(texts_per_pair):
            out.append(
                Candidate(
                    image_id,
                    k,
                    10_000 + k,
                    1,
                    1,
                    "Person",
                    "Person",
                    f"rel{(k + t) % 3}",
                    "l",
                    [0],
                    1,
                    "name",
                    "person",
                    "name",
                    "person",
                )
            )
    return out


@pytest.mark.parametrize(
    "n_pairs,sizes",
    [(1, [1]), (99, [99]), (100, [100]), (101, [100, 1]), (200, [100, 100]), (250, [100, 100, 50])],
)
def test_group_sizes(n_pairs, sizes):
    groups = group_candidates(_cands(1, n_pairs), 100)
    assert [len(g.pairs) for g in groups] == sizes  # never an empty trailing group
    assert [p for g in groups for p in g.pairs] == [(k, 10_000 + k) for k in range(n_pairs)]


def test_group_texts_and_indices():
    cands = _cands(1, 5, texts_per_pair=2) + _cands(2, 2)
    groups = group_candidates(cands, 3)
    assert [(g.image_id, len(g.pairs)) for g in groups] == [(1, 3), (1, 2), (2, 2)]
    g = groups[0]
    assert g.texts == ["rel0", "rel1", "rel2"]
    assert g.pair_texts == [[0, 1], [1, 2], [0, 2]]
    for grp in groups:
        assert grp.texts == sorted(set(grp.texts))
        for pair, idx in zip(grp.pairs, grp.pair_texts):
            want = sorted(
                {
                    c.relation
                    for c in cands
                    if c.image_id == grp.image_id and (c.subject_ann_id, c.object_ann_id) == pair
                }
            )
            assert [grp.texts[i] for i in idx] == want
    assert group_candidates([], 100) == []
    assert isinstance(groups[0], PairGroup)


def test_group_from_match_output(o365, scene):
    images, rels = scene
    out = match_batch(images, rels, MatchConfig(), o365)
    groups = group_candidates(out.candidates, 4)
    assert [(g.image_id, len(g.pairs)) for g in groups] == [(1, 4), (1, 2), (2, 1)]
    assert sum(len(g.pairs) for g in groups) == out.stats["pairs"]


@pytest.mark.parametrize("n_q", [0, -1, 2.5])
def test_group_rejects_bad_n_q(n_q):
    with pytest.raises(ValueError, match=f"n_q must be a positive int, got {n_q}"):
        group_candidates([], n_q)
