"""Which vocabulary a detection file uses (COCO, Objects365 v2, Objects365 v1), inferred from its categories;
Objects365 v1 names mapped to the v2 synonym lists; the CLI's line saying what it inferred."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from PIL import Image

from models.matcher import Vocabulary, identify_vocabulary
from tasks.config import PipelineConfig, check_tagger_numbering, fill_inferred


def _data(name: str):
    return json.loads(resources.files("models.data.synonyms").joinpath(name).read_text(encoding="utf-8"))


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


COCO = [{"id": i, "name": n} for n, i in _data("coco_object_names.json").items()]
O365_V2 = _data("o365_categories.json")
O365_V1 = _data("o365_v1.json")["categories"]


# ---- the shipped v1 list and its mapping -------------------------------------------------------------------


def test_v1_list_is_the_official_365_with_the_names_users_see():
    assert len(O365_V1) == 365 and sorted(c["id"] for c in O365_V1) == list(range(1, 366))
    by_id = {c["id"]: c["name"] for c in O365_V1}
    # the names the issue reports from real v1 files, at their v1 ids
    assert (by_id[1], by_id[24], by_id[30], by_id[38], by_id[79]) == (
        "human", "monitor", "dining table", "sofa", "cellphone",
    )  # fmt: skip
    # v1 and v2 number categories differently: matching by id would be wrong
    v2 = {c["id"]: c["name"] for c in O365_V2}
    assert (by_id[4], v2[4]) == ("hat", "Other Shoes")


def test_the_61_v1_names_without_a_v2_list_now_resolve():
    """Counted plainly from the shipped files: 61 v1 names are not keys of the v2 (RLIPv2) lists."""
    para = _data("o365_obj_paraphrase.json")
    unmatched = sorted({_norm(c["name"]) for c in O365_V1} - set(para))
    assert len(unmatched) == 61
    vocab = Vocabulary.from_categories(O365_V1, "o365")
    by_label = {_norm(c.label): c for c in vocab.classes}
    mapping = _data("o365_v1.json")["to_v2"]
    assert sorted(mapping) == unmatched  # every one has an entry, checked by hand
    with_list = [n for n in unmatched if by_label[n].synonyms]
    without = sorted(n for n in unmatched if not by_label[n].synonyms)
    assert len(with_list) == 48
    assert without == [
        "dates", "flashlight", "iron", "llama", "mangosteen", "measuring cup", "microscope", "pitaya", "radio",
        "saw", "starfish", "tortoise/turtle", "vent",
    ]  # fmt: skip
    # every class of the other 304 keeps its own v2 list
    assert all(c.synonyms for c in vocab.classes if _norm(c.label) not in unmatched)


@pytest.mark.parametrize(
    "v1_name, v2_key",
    [
        ("human", "person"),
        ("sofa", "couch"),
        ("monitor", "monitor/tv"),
        ("cellphone", "cell phone"),
        ("dining table", "dinning table"),
        ("handbag", "handbag/satchel"),
        ("motorbike/motorcycle", "motorcycle"),
        ("Accordion/keyboard/piano", "piano"),
        ("pine apple", "pineapple"),
        ("table tennis  paddle", "table tennis paddle"),  # two spaces in the v1 file: same key
        ("polar bear", "bear"),
    ],
)
def test_v1_names_take_the_v2_lists(v1_name, v2_key):
    vocab = Vocabulary.from_categories(O365_V1, "o365")
    (cls,) = [c for c in vocab.classes if c.label == v1_name]
    assert cls.key == v2_key and cls.synonyms == tuple(_data("o365_obj_paraphrase.json")[v2_key])


def test_v1_file_matches_captions_as_v2_does():
    """The same boxes under v1 and v2 names match the same caption words (ids differ)."""
    v1 = Vocabulary.from_categories(O365_V1, "o365")
    v2 = Vocabulary.load("o365")
    # v1: human=1, sofa=38, cellphone=79; v2: Person=1, Couch=51, Cell Phone=62
    for text, v1_id, v2_id in [("a young man", 1, 1), ("the couch", 38, 51), ("a smartphone", 79, 62)]:
        m1, m2 = v1.match(text, present={v1_id}), v2.match(text, present={v2_id})
        assert m1 is not None and m2 is not None, text
        assert (m1.category_id, m2.category_id) == (v1_id, v2_id) and m1.synonym == m2.synonym


# ---- inference -------------------------------------------------------------------------------------------


def test_identify_coco_v2_v1():
    g = identify_vocabulary(COCO)
    assert (g.vocabulary, g.edition, g.hits["coco"], g.n) == ("coco", "coco", 80, 80)
    assert g.describe() == "vocabulary: coco (80 of 80 categories are COCO's)"
    g = identify_vocabulary(O365_V2)
    assert (g.vocabulary, g.edition) == ("o365", "o365_v2")
    assert g.describe() == "vocabulary: o365 (365 of 365 categories are Objects365 v2's)"
    g = identify_vocabulary(O365_V1)
    assert (g.vocabulary, g.edition) == ("o365", "o365_v1")
    assert g.describe().startswith("vocabulary: o365 (365 of 365 categories are Objects365 v1's")
    # official names with other case / spacing, and the typo-fixed keys, still count
    assert (
        identify_vocabulary([{"id": 53, "name": "basket"}, {"id": 1, "name": " PERSON"}]).edition == "o365_v2"
    )
    # a subset of COCO (10 classes)
    assert identify_vocabulary(COCO[10:20]).vocabulary == "coco"


def test_ambiguous_or_unknown_categories_ask_for_the_vocabulary():
    # id 1 'person' is COCO's and Objects365 v2's
    g = identify_vocabulary([{"id": 1, "name": "person"}])
    assert g.vocabulary is None
    with pytest.raises(ValueError, match=r"fit both COCO .* and Objects365 .*--vocabulary \{o365,coco\}"):
        g.require()
    # v1 and v2 agree on ids 2 and 3: both are o365, so that is not ambiguous
    assert (
        identify_vocabulary([{"id": 2, "name": "sneakers"}, {"id": 3, "name": "chair"}]).vocabulary == "o365"
    )
    g = identify_vocabulary([{"id": 1, "name": "person"}, {"id": 2, "name": "forklift"}])
    with pytest.raises(ValueError, match=r"not all COCO's \(1 of 2\).*2 'forklift'.*--vocabulary"):
        g.require()
    # COCO names under other ids are not COCO
    assert identify_vocabulary([{"id": 3, "name": "person"}]).vocabulary is None


def test_fill_inferred_only_what_was_not_given():
    data, notes = fill_inferred({}, COCO)
    assert data == {"dataset": "coco", "match": {"vocabulary": "coco"}}
    assert notes == [
        "vocabulary: coco (80 of 80 categories are COCO's)",
        "dataset: coco (from the vocabulary; --dataset names it)",
    ]
    data, notes = fill_inferred({"match": {"vocabulary": "o365"}}, COCO)  # given: kept, with a warning
    assert data == {"dataset": "objects365", "match": {"vocabulary": "o365"}}
    assert notes == [
        "warning: match.vocabulary is 'o365' as given, but 80 of 80 categories are COCO's",
        "dataset: objects365 (from the vocabulary; --dataset names it)",
    ]
    data, notes = fill_inferred({"match": {"vocabulary": "o365"}, "dataset": "x"}, O365_V2)
    assert notes == []  # given and agreeing: nothing to say
    data, notes = fill_inferred({"dataset": "mine"}, O365_V1)
    assert data["match"]["vocabulary"] == "o365" and data["dataset"] == "mine" and len(notes) == 1


# ---- the command line -------------------------------------------------------------------------------------


def _write(tmp_path, categories, name="det.json"):
    img = tmp_path / "images"
    img.mkdir(exist_ok=True)
    Image.new("RGB", (100, 100), (90, 120, 150)).save(img / "a.jpg")  # a real image: planning checks it
    det = tmp_path / name
    det.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": categories[0]["id"], "bbox": [1, 1, 20, 20]}],
        "categories": categories,
    }))  # fmt: skip
    return str(det), str(img)


def test_cli_infers_coco_and_files_it_under_coco(tmp_path, capsys):
    from flows.cli import main

    det, img = _write(tmp_path, COCO)
    out = tmp_path / "out"
    assert main(["plan", "--annotations", det, "--images", img, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "reltag plan: vocabulary: coco (80 of 80 categories are COCO's)" in err.splitlines()
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["coco"]  # not objects365/


def test_cli_ambiguous_is_one_line_asking_for_vocabulary(tmp_path, capsys):
    from flows.cli import main

    det, img = _write(tmp_path, [{"id": 1, "name": "person"}])
    rc = main(["plan", "--annotations", det, "--images", img, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2 and len(err) == 1 and err[0].startswith("reltag plan: error: ") and "--vocabulary" in err[0]
    )
    # given, it is used as it is
    rc = main(
        ["plan", "--annotations", det, "--images", img, "--out", str(tmp_path / "o"), "--vocabulary", "coco"]
    )
    assert rc == 0 and (tmp_path / "o" / "coco").is_dir()


def test_cli_warns_about_categories_without_synonyms(tmp_path, capsys):
    from flows.cli import main

    det, img = _write(tmp_path, O365_V1)
    assert main(["plan", "--annotations", det, "--images", img, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.splitlines()
    (warn,) = [line for line in err if "warning" in line]
    assert warn.startswith("reltag plan: warning: 13 of 365 categories have no synonym list")
    assert "'dates'" in warn and "'vent'" in warn and "'human'" not in warn


def test_the_sample_under_v1_names_matches_as_under_v2(monkeypatch):
    """The bundled sample's boxes relabelled with Objects365 v1 categories (by hand: v1 ids read off the v1
    list) give the same candidates as under v2 names; without the mapping 5 of its 14 matched relations are lost.
    """
    import models.matcher as matcher
    from flows.cli import EXAMPLES
    from storage.records import Box, Caption, ImageRecord
    from tasks.config import MatchConfig, ParseConfig
    from tasks.stages.match import match_batch
    from tasks.stages.parse import parse_batch

    det = json.loads((EXAMPLES / "sample_detections.json").read_text())
    caps = json.loads((EXAMPLES / "sample_captions.json").read_text())["annotations"]
    v2_name = {c["id"]: c["name"] for c in det["categories"]}
    v1_id = {"Person": 1, "Cup": 8, "Street Lights": 14, "Plate": 16, "Helmet": 17, "Gloves": 20, "Flag": 33,
             "Camera": 71, "Tripod": 96, "Spoon": 100, "Dinning Table": 30, "Airplane": 110, "Cat": 148}  # fmt: skip
    v1_name = {c["id"]: c["name"] for c in O365_V1}
    assert {v2_name[a["category_id"]] for a in det["annotations"]} == set(v1_id)

    def images(v1: bool):
        out = []
        for im in det["images"]:
            boxes = []
            for a in det["annotations"]:
                if a["image_id"] == im["id"]:
                    cid = v1_id[v2_name[a["category_id"]]] if v1 else a["category_id"]
                    boxes.append(Box(a["id"], cid, (v1_name if v1 else v2_name)[cid], *a["bbox"]))
            order = list(dict.fromkeys(b.category_id for b in boxes))
            out.append(
                ImageRecord(im["id"], im["file_name"], im["width"], im["height"], 0, boxes, None, order)
            )
        return out

    captions = []
    for im in det["images"]:
        for k, a in enumerate(a for a in caps if a["image_id"] == im["id"]):
            captions.append(Caption(im["id"], k, a["caption"], False, "oracle", "r", "{}", a["id"]))
    relations = parse_batch(captions, ParseConfig()).relations

    def run(v1: bool):
        vocab = Vocabulary.from_categories(O365_V1 if v1 else O365_V2, "o365")
        out = match_batch(images(v1), relations, MatchConfig(), vocab)
        pairs = {(c.image_id, c.subject_ann_id, c.object_ann_id, c.relation) for c in out.candidates}
        return out.stats["relations"], out.stats["relations_matched"], pairs

    n, matched_v2, pairs_v2 = run(v1=False)
    assert (n, matched_v2) == (39, 14)
    assert run(v1=True) == (39, 14, pairs_v2)
    matcher._o365_v1.cache_clear()
    monkeypatch.setattr(matcher, "_o365_v1_to_v2", dict)  # the mapping switched off: v1 names as they were
    _, matched_off, pairs_off = run(v1=True)
    assert matched_off == 9 and pairs_off < pairs_v2


def test_rtagger_refuses_a_numbering_it_would_misread():
    """The R-Tagger keys boxes by category id (the reference's numbering): v1 ids would score a hat as 'other
    shoes' (only 6 v1 categories, e.g. 2 sneakers and 3 chair, have their v2 id); v2 and COCO files pass."""
    rt = {"tag": {"tagger": "rtagger", "checkpoint": "/models/rtagger"}}
    o365 = PipelineConfig.model_validate({**rt, "match": {"vocabulary": "o365"}})
    with pytest.raises(
        ValueError, match=r"359 of 365 categories are not Objects365 v2's \(e.g. category 1 'human'\)"
    ):
        check_tagger_numbering(o365, O365_V1)
    check_tagger_numbering(o365, O365_V2)
    check_tagger_numbering(PipelineConfig.model_validate({**rt, "match": {"vocabulary": "coco"}}), COCO)
    check_tagger_numbering(
        PipelineConfig.model_validate({"match": {"vocabulary": "o365"}}), O365_V1
    )  # greedy
