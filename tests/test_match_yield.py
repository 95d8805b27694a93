"""The correct mode's yield: partitive heads resolved through the caption's "of" links, the synonym extensions
(data files with provenance, a switch, per-extension counts), losses by reason, and what stays as it was:
reference mode and its keys."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from models import matcher
from models.matcher import PARTITIVES, Vocabulary, extensions, partitive_kind
from storage.records import Box, Caption, ImageRecord, ParsedRelation
from tasks.config import MatchConfig, PipelineConfig
from tasks.run import registry
from tasks.stages.match import match_batch
from tasks.stages.parse import parse_batch


def _synonym_file(name: str):
    return json.loads(resources.files("models.data.synonyms").joinpath(name).read_text())


COCO = _synonym_file("coco_object_names.json")


def _image(image_id: int, *classes: str) -> ImageRecord:
    boxes = [Box(100 * image_id + k, COCO[c], c, 10.0 * k, 0.0, 50.0, 50.0) for k, c in enumerate(classes)]
    return ImageRecord(image_id, f"{image_id}.jpg", 640, 480, 0, boxes, list(range(len(boxes))),
                       list(dict.fromkeys(COCO[c] for c in classes)))  # fmt: skip


def _rel(image_id, caption_id, s, s_head, rel, o, o_head) -> ParsedRelation:
    return ParsedRelation(image_id, caption_id, s, s_head, rel, rel, o, o_head)


@pytest.fixture(scope="module")
def coco_ext():
    return Vocabulary.load("coco", extensions=True)


@pytest.fixture(scope="module")
def coco_plain():
    return Vocabulary.load("coco")


# the parser's graph of "Two men holding a pair of skis next to a car." and "A group of sheep near a man."
PAIR_OF_SKIS = [
    _rel(1, 0, "Two men", "men", "holding", "a pair", "pair"),
    _rel(1, 0, "a pair", "pair", "of", "skis", "skis"),
    _rel(1, 0, "Two men", "men", "next to", "a car", "car"),
    _rel(1, 1, "A group", "group", "of", "sheep", "sheep"),
    _rel(1, 1, "A group", "group", "near", "a man", "man"),
]


def _triples(out):
    return [
        (c.subject_label, c.relation, c.object_label, c.subject_ann_id, c.object_ann_id)
        for c in out.candidates
    ]


def test_partitive_heads_are_matched_by_their_of_complement(coco_ext):
    im = _image(1, "person", "skis", "car", "sheep")
    out = match_batch([im], PAIR_OF_SKIS, MatchConfig(vocabulary="coco"), coco_ext)
    assert _triples(out) == [
        ("person", "holding", "skis", 100, 101),
        ("person", "next to", "car", 100, 102),
        ("sheep", "near", "person", 103, 100),
    ]
    s = out.stats
    # the two "of" links resolve the heads; they are not relations between two things
    assert s["relations_unmatched"] == {"partitive_link": 2}
    assert s["partitive_matches"] == {"pair": 1, "group": 1}
    assert s["relations_with_candidates"] == 3 and s["relations"] == 5


def test_without_partitives_the_heads_stay_and_match_nothing(coco_plain):
    im = _image(1, "person", "skis", "car", "sheep")
    out = match_batch(
        [im], PAIR_OF_SKIS, MatchConfig(vocabulary="coco", partitives=False, extensions=False), coco_plain
    )
    assert _triples(out) == [("person", "next to", "car", 100, 102)]
    # "a pair" (object), "a pair" -of-> skis, "A group" -of-> sheep and "A group" near a man (subjects)
    assert out.stats["relations_unmatched"] == {"no_object_match": 1, "no_subject_match": 3}
    assert out.stats["partitive_matches"] == {}


def test_a_head_with_two_different_complements_is_not_guessed(coco_ext):
    im = _image(1, "person", "sheep", "cow")
    rels = [
        _rel(1, 0, "a group", "group", "of", "sheep", "sheep"),
        _rel(1, 0, "a group", "group", "of", "cows", "cows"),  # the same span, another complement
        _rel(1, 0, "a group", "group", "near", "a man", "man"),
    ]
    out = match_batch([im], rels, MatchConfig(vocabulary="coco"), coco_ext)
    assert out.candidates == []
    assert out.stats["relations_unmatched"] == {"partitive_link": 2, "no_subject_match": 1}


def test_complements_belong_to_their_caption(coco_ext):
    """ "a pair" of caption 0 is skis; "a pair" of caption 1 has no complement and stays unmatched."""
    im = _image(1, "person", "skis")
    rels = [
        _rel(1, 0, "a pair", "pair", "of", "skis", "skis"),
        _rel(1, 1, "A man", "man", "holding", "a pair", "pair"),
    ]
    out = match_batch([im], rels, MatchConfig(vocabulary="coco"), coco_ext)
    assert out.candidates == []
    assert out.stats["relations_unmatched"] == {"partitive_link": 1, "no_object_match": 1}


def test_an_extension_marked_not_with_of_skips_an_entity_with_an_of_complement(coco_ext):
    rels = [
        _rel(1, 0, "A man", "man", "pouring", "a pitcher", "pitcher"),
        _rel(1, 0, "a pitcher", "pitcher", "of", "water", "water"),
        _rel(1, 1, "the pitcher", "pitcher", "throwing", "a ball", "ball"),
    ]
    # two person boxes: were "a pitcher" of caption 0 a person, (person, pouring, person) would be a candidate
    im = _image(1, "person", "person", "vase", "sports ball")
    out = match_batch([im], rels, MatchConfig(vocabulary="coco"), coco_ext)
    # caption 0: a jug (no person, and COCO's vase list has no pitcher); caption 1: the baseball pitcher
    assert {(c.subject_label, c.relation, c.object_label) for c in out.candidates} == {
        ("person", "throwing", "sports ball")
    }
    assert out.stats["relations_unmatched"] == {"no_object_match": 1, "no_match_either": 1}


def test_extension_candidates_are_counted_per_phrase_and_class(coco_ext):
    im = _image(1, "person", "person", "dining table")
    rels = [
        _rel(1, 0, "A kid", "kid", "sitting at", "a table", "table"),
        _rel(1, 1, "Two kids", "kids", "next to", "a man", "man"),
    ]
    out = match_batch([im], rels, MatchConfig(vocabulary="coco"), coco_ext)
    # caption 0: 2 kids-boxes x 1 table = 2 candidates; caption 1: the two person boxes both ways = 2
    assert len(out.candidates) == 4
    assert dict(map(tuple, out.stats["extension_candidates"])) == {
        "kid -> person": 4,
        "table -> dining table": 2,
    }
    assert out.stats["entity_rules"] == {"extension": 3, "synonym": 1}  # kid, kids (lemma), table; man


def test_the_switch_turns_the_extensions_off_and_a_mismatched_vocabulary_is_refused(coco_ext, coco_plain):
    im = _image(1, "person", "dining table")
    rels = [_rel(1, 0, "A kid", "kid", "at", "a table", "table")]
    off = MatchConfig(vocabulary="coco", extensions=False)
    assert match_batch([im], rels, off, coco_plain).candidates == []
    with pytest.raises(
        ValueError, match="carries synonym extensions but match.mode is 'correct' with extensions False"
    ):
        match_batch([im], rels, off, coco_ext)
    with pytest.raises(ValueError, match="match.mode is 'reference'"):
        match_batch([im], rels, MatchConfig(vocabulary="coco", mode="reference"), coco_ext)


def test_real_parser_captions_gain_candidates(coco_ext, coco_plain):
    """End to end through sng_parser: the partitive and extension candidates appear, and nothing else changes."""
    texts = [
        "A herd of cattle standing next to a truck.",
        "A bunch of bananas sitting on a table.",
        "A kid riding a pony.",
        "A man sitting on a bench.",
    ]
    caps = [Caption(1, k, t, False, "oracle", "oracle", "oracle") for k, t in enumerate(texts)]
    rels = parse_batch(caps, PipelineConfig().parse).relations
    im = _image(1, "cow", "truck", "banana", "dining table", "person", "horse", "bench")
    new = match_batch([im], rels, MatchConfig(vocabulary="coco"), coco_ext)
    old = match_batch(
        [im], rels, MatchConfig(vocabulary="coco", partitives=False, extensions=False), coco_plain
    )
    got = {(c.subject_label, c.relation, c.object_label) for c in new.candidates}
    assert {(c.subject_label, c.relation, c.object_label) for c in old.candidates} == {
        ("person", "sitting on", "bench")
    }
    assert got == {
        ("cow", "next to", "truck"),
        ("banana", "sitting on", "dining table"),
        ("person", "riding", "horse"),
        ("person", "sitting on", "bench"),
    }


# -- the maintained lists -----------------------------------------------------------------------------------


def test_partitive_list_has_no_container_and_resolves_plurals():
    for container in (
        "cup",
        "plate",
        "bowl",
        "box",
        "glass",
        "bottle",
        "bag",
        "basket",
        "jar",
        "vase",
        "model",
    ):
        assert container not in PARTITIVES
    assert partitive_kind("groups") == "collective" and partitive_kind("bunches") == "collective"
    assert partitive_kind("halves") == "portion" and partitive_kind("a slice") == "portion"
    assert partitive_kind("man") is None and partitive_kind("") is None


@pytest.mark.parametrize("name", ["coco", "o365"])
def test_every_extension_has_provenance_and_adds_something_new(name):
    para = _synonym_file(f"{name}_obj_paraphrase.json")
    ext = extensions(name)
    assert len(ext) >= 50
    for e in ext:
        assert e.key in para and e.why.strip()
        assert e.phrase not in para[e.key]
    # the reference lists are untouched: a plain vocabulary has no extension phrase
    v = Vocabulary.load(name)
    assert all(not c.extensions for c in v.classes)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"phrase": "kid", "class": "persn", "why": "x"}, "'persn' is not a class key"),
        ({"phrase": "kid", "class": "person"}, "says no 'why'"),
        ({"phrase": "man", "class": "person", "why": "x"}, "already has 'man'"),
        ({"phrase": "Kid ", "class": "person", "why": "x"}, "lower-case words"),
        ({"phrase": "kid", "class": "person", "why": "x", "not_with_of": "yes"}, "'not_with_of' must be"),
        ({"phrase": "kid", "class": "person", "why": "x", "not_after": "its"}, "'not_after' must be a list"),
    ],
)
def test_a_bad_extension_entry_is_refused_naming_it(monkeypatch, entry, message):
    real = matcher._read_json

    def fake(name):
        if name == "coco_extensions.json":
            return {
                "vocabulary": "coco",
                "entries": [{"phrase": "tot", "class": "person", "why": "ok"}, entry],
            }
        return real(name)

    monkeypatch.setattr(matcher, "_read_json", fake)
    matcher.extensions.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"coco_extensions.json entry 1 .*" + message):
            extensions("coco")
    finally:
        matcher.extensions.cache_clear()


# -- keys ---------------------------------------------------------------------------------------------------


def _match_link(cfg: PipelineConfig):
    _, links = registry.chain(
        cfg, {"annotations_sha256": "a" * 64, "images_root": "/i", "captions_sha256": "c" * 64}
    )
    return next(link for link in links if link.stage == "match")


def test_reference_mode_keys_ignore_the_correct_mode_switches():
    ref = PipelineConfig(match={"mode": "reference"})
    ref_off = PipelineConfig(match={"mode": "reference", "partitives": False, "extensions": False})
    assert _match_link(ref).key == _match_link(ref_off).key
    assert _match_link(ref).settings == {"vocabulary": "o365", "mode": "reference"}
    assert _match_link(ref).revision == ""


def test_correct_mode_keys_follow_each_switch_and_the_extension_file():
    on = _match_link(PipelineConfig())
    assert on.revision.startswith("extensions:")
    keys = {
        on.key,
        _match_link(PipelineConfig(match={"partitives": False})).key,
        _match_link(PipelineConfig(match={"extensions": False})).key,
    }
    assert len(keys) == 3
    assert _match_link(PipelineConfig(match={"extensions": False})).revision == ""


def test_the_audit_and_the_report_show_the_yield_and_what_the_extensions_bought(coco_ext):
    from tasks.audit.report import _yield
    from tasks.audit.summary import audit, audit_tables

    im = _image(1, "person", "person", "skis", "dining table")
    rels = PAIR_OF_SKIS[:2] + [_rel(1, 2, "A kid", "kid", "at", "a table", "table")]
    a = audit({"match": match_batch([im], rels, MatchConfig(vocabulary="coco"), coco_ext).stats}, None, [])
    assert a["matching_yield"] == {
        "relations": 3,
        "relations_with_candidates": 2,
        "yield": 0.6667,
        "lost": {"partitive_link": 1},
        "partitive_matches": {"pair": 1},
        "extension_candidates": [["kid -> person", 2], ["table -> dining table", 2]],
    }
    assert audit_tables(a)["extension_candidates"].to_pylist() == [
        {"extension": "kid -> person", "candidates": 2},
        {"extension": "table -> dining table", "candidates": 2},
    ]
    html = _yield(a)
    assert "2 of 3 parsed relations became candidates (yield 0.667). Lost: partitive_link 1." in html
    assert "pair 1" in html and "kid -&gt; person" in html
    assert "the matching yield: not available for this run" in _yield({})  # a run from before the yield stats
