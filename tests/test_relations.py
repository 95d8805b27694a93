"""The pre-training reader (storage/relations.py) and RelationDataset (models/rlipv2/data.py), rule by rule.

Runs are hand-made Parquet folders laid out exactly as reltag writes them (plan.json, runs/<key>.json, images/,
triplets/<key>/, stats/<key>/run.json, _ledger/ write markers), so each case controls every row; each rule's case
is built so that doing the steps in another order gives another answer (worked out by hand in the comments).
"""

from __future__ import annotations

import json
import os
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.rlipv2.data import RelationDataset, VGImage, reference_item
from storage.atomic import write_json
from storage.layout import RunLayout
from storage.ledger import Ledger, Unit
from storage.manifest import ChainLink, PlanManifest, RunRecord, ShardInfo
from storage.relations import RunNotFinished, RunSource, resolve_source
from storage.rules import boxes_overlap
from storage.schemas import IMAGES, REJECTS, TRIPLETS

# o365 class keys of category ids 1, 3, 5, 6 (models/data/synonyms/o365_obj_paraphrase.json, position + 1)
PERSON, CHAIR, HAT, CAR = 1, 3, 5, 6


def img(image_id, boxes, width=100, height=50, file_name=None):
    """An images-file row; boxes: [(ann_id, category_id, x, y, w, h)]."""
    return {
        "image_id": image_id, "file_name": file_name or f"im{image_id}.jpg", "width": width, "height": height,
        "shard": 0,
        "boxes": [{"ann_id": a, "category_id": c, "label": f"L{c}", "x": x, "y": y, "w": w, "h": h}
                  for a, c, x, y, w, h in boxes],
        "box_file_index": None, "class_order": None,
    }  # fmt: skip


def trip(image_id, s, o, rel, p_r, p_s=1.0, p_o=1.0, sbox=(0, 0, 10, 10), obox=(0, 0, 10, 10)):
    return {
        "image_id": image_id, "subject_ann_id": s, "object_ann_id": o, "subject_category_id": 1,
        "object_category_id": 1, "subject_label": "a", "object_label": "b", "subject_box": list(sbox),
        "object_box": list(obox), "relation": rel, "relation_lemma": rel, "confidence": p_s * p_o * p_r,
        "p_subject": p_s, "p_object": p_o, "p_relation": p_r, "relation_rank": 1, "caption_ids": [0],
        "n_captions": 1, "tagger": "test", "run_key": "k",
    }  # fmt: skip


def _write(fs, path, table, row_group_size=None):
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def make_run(
    root, shards, run_key="run0", dataset="t", vocabulary="o365", rule="relation_only", eta=0.0,
    row_group_size=None, rejects=None, finished=True, images_root="/imgs/train2017",
):  # fmt: skip
    """Write a finished (or not) run; shards: [(image rows, triplet rows)]. Returns the plan folder."""
    plan_key = f"plan-{run_key}"
    th_key = f"th-{run_key}"
    layout = RunLayout(str(root), dataset, run_key, plan_key, (("threshold", th_key), ("write", run_key)))
    fs = layout.fs
    for k, (images, trips) in enumerate(shards):
        for r in images:
            r["shard"] = k
        fs.makedirs(posixpath.dirname(layout.images(k)), exist_ok=True)
        _write(fs, layout.images(k), pa.Table.from_pylist(images, schema=IMAGES))
        fs.makedirs(posixpath.dirname(layout.triplets(k)), exist_ok=True)
        _write(fs, layout.triplets(k), pa.Table.from_pylist(trips, schema=TRIPLETS), row_group_size)
    for k, rows in (rejects or {}).items():
        fs.makedirs(posixpath.dirname(layout.rejects(k, 0)), exist_ok=True)
        _write(fs, layout.rejects(k, 0), pa.Table.from_pylist(rows, schema=REJECTS))
    plan = PlanManifest(
        plan_key, dataset, "2026-01-01T00:00:00", {}, [],
        [ShardInfo(k, len(s[0]), 1) for k, s in enumerate(shards)], {}, 0, {}, {},
    )  # fmt: skip
    write_json(fs, layout.plan_manifest, plan.to_dict())
    record = RunRecord(
        run_key, dataset, plan_key, "2026-01-01T00:00:00",
        [ChainLink("threshold", th_key, "x", {}, ""), ChainLink("write", run_key, th_key, {}, "")],
        {"match": {"vocabulary": vocabulary}, "threshold": {"rule": rule, "eta": eta}, "tag": {"tagger": "t"}},
        {}, {}, {"images_root": images_root},
    )  # fmt: skip
    write_json(fs, layout.manifest, record.to_dict())
    if finished:
        ledger = Ledger(layout)
        for k in range(len(shards)):
            ledger.record_done(Unit("write", k), {})
        write_json(fs, layout.run_stats, {"triplets": sum(len(s[1]) for s in shards)})
    return layout.base


def items(ds) -> list[VGImage]:
    return list(ds)


# ------------------------------------------------------------------------------------------------ the rules


def test_threshold_then_cap_then_merge_120_rows(tmp_path):
    """One image, 130 rows in file order:
    rows 0-19: pair (1,2), "a0".."a19", p_relation 0.1 (below eta 0.2);
    rows 20-49: pair (1,2) "on" 30 times (duplicates), p 0.9;
    rows 50-129: j = 0..79, pair (3, 4 + j // 10), "r{j % 10}", p 0.9 (80 distinct rows).
    Threshold first: rows 20-129 (110); first 100 of them: rows 20-119 = 30 "on" + j 0..69, so pairs
    (1,2) and (3,4)..(3,10) survive and (3,11) (j 70-79) does not. Capping before thresholding would keep rows 0-99
    (pairs up to (3,8)); merging before capping would keep all 81 distinct rows, (3,11) included.
    """
    boxes = [(1, HAT, 0, 0, 5, 5), (2, PERSON, 0, 0, 5, 5), (3, HAT, 0, 0, 5, 5)]
    boxes += [(a, CHAIR, 0, 0, 5, 5) for a in range(4, 12)] + [(12, CAR, 0, 0, 5, 5)]  # 12: in no relation
    rows = [trip(1, 1, 2, f"a{i}", 0.1) for i in range(20)]
    rows += [trip(1, 1, 2, "on", 0.9) for _ in range(30)]
    rows += [trip(1, 3, 4 + j // 10, f"r{j % 10}", 0.9) for j in range(80)]
    plan = make_run(tmp_path, [([img(1, boxes)], rows)])
    (it,) = items(RelationDataset([plan], eta=0.2))
    assert len(it.relationships) == 100
    assert it.relation_texts == ["on"] + [f"r{i}" for i in range(10)]
    assert it.pairs == [(1, 2)] + [(3, k) for k in range(4, 11)]
    assert it.pair_labels == [[1] + [0] * 10] + [[0] + [1] * 10] * 7
    # object texts: every box (12, in no relation, included), unique, first seen first
    assert it.object_texts == ["hat", "person", "chair", "car"]
    assert it.labels == [0, 1, 0] + [2] * 8 + [3]
    assert [o.name for o in it.objects][:3] == ["hat", "person", "hat"]
    # a smaller cap counts the duplicates too: 30 "on" rows and 5 more -> (1,2) and (3,4) only
    (it5,) = items(RelationDataset([plan], eta=0.2, max_relations=35))
    assert it5.pairs == [(1, 2), (3, 4)] and it5.relation_texts == ["on", "r0", "r1", "r2", "r3", "r4"]


def test_eta_is_inclusive_and_the_rule_is_recomputed_from_the_factors(tmp_path):
    # binary fractions, so float32 storage is exact: 0.25 >= 0.25 is kept
    rows = [
        trip(1, 1, 2, "at_eta", 0.25),  # relation_only 0.25; paper 0.25
        trip(1, 1, 2, "paper_low", 0.5, p_s=0.5, p_o=0.5),  # relation_only 0.5; paper 0.125
        trip(1, 1, 2, "below", 0.2490234375),  # just under 0.25 in both
        trip(1, 2, 1, "nan", float("nan")),
    ]
    plan = make_run(tmp_path, [([img(1, [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)])], rows)])
    (a,) = items(RelationDataset([plan], eta=0.25, rule="relation_only"))
    assert [r.predicate for r in a.relationships] == ["at_eta", "paper_low"]
    assert [r.confidence for r in a.relationships] == [0.25, 0.5]
    (b,) = items(RelationDataset([plan], eta=0.25, rule="paper"))
    assert [r.predicate for r in b.relationships] == ["at_eta"]
    assert items(RelationDataset([plan], eta=0.6)) == []  # nothing left: the image is dropped
    with pytest.raises(ValueError, match="unknown confidence rule 'product'"):
        RelationDataset([plan], rule="product")


def test_overlap_filter_comes_after_the_threshold_and_before_the_cap(tmp_path):
    """Image 1: 4 rows of a non-overlapping pair, then 2 of an overlapping one, max_relations 3.
    Overlap before the cap keeps the 2 overlapping rows; the cap first would keep 3 non-overlapping rows and the
    filter would then empty (drop) the image. Image 2: its only row fails eta and its boxes overlap: dropped either
    way. Image 3: passes eta, boxes apart: kept without the filter, dropped with it."""
    far = dict(sbox=(0, 0, 10, 10), obox=(50, 0, 10, 10))
    near = dict(sbox=(0, 0, 10, 10), obox=(5, 5, 10, 10))
    rows = [trip(1, 1, 2, f"far{i}", 0.9, **far) for i in range(4)] + [
        trip(1, 1, 3, f"near{i}", 0.9, **near) for i in range(2)
    ]
    rows += [trip(2, 1, 2, "low", 0.1, **near), trip(3, 1, 2, "apart", 0.9, **far)]
    b = [(1, PERSON, 0, 0, 10, 10), (2, HAT, 50, 0, 10, 10), (3, CAR, 5, 5, 10, 10)]
    plan = make_run(tmp_path, [([img(1, b), img(2, b), img(3, b)], rows)])
    on = items(RelationDataset([plan], overlap_filter=True, max_relations=3))
    assert [i.image_id for i in on] == [1]
    assert [r.predicate for r in on[0].relationships] == ["near0", "near1"]
    off = items(RelationDataset([plan], max_relations=3))
    assert [i.image_id for i in off] == [1, 3]
    assert [r.predicate for r in off[0].relationships] == ["far0", "far1", "far2"]
    # a shared area > 0 on both axes (storage.rules; tests/test_rules.py): touching is apart
    assert boxes_overlap([0, 0, 10, 10], [9, 9, 10, 10]) and not boxes_overlap(
        [0, 0, 10, 10], [10, 0, 10, 10]
    )


def test_boxes_are_clamped_to_the_image_and_degenerate_ones_kept(tmp_path):
    boxes = [
        (1, PERSON, -10, 5, 30, 20),  # -> (0, 5, 20, 25)
        (2, HAT, 90, 40, 30, 30),  # -> (90, 40, 100, 50)
        (3, CAR, 120, 60, 5, 5),  # wholly outside -> (100, 50, 100, 50): zero area, kept
    ]
    rows = [trip(1, 1, 2, "on", 0.9), trip(1, 3, 1, "near", 0.9)]
    plan = make_run(tmp_path, [([img(1, boxes, width=100, height=50)], rows)])
    (it,) = items(RelationDataset([plan]))
    assert [o.xyxy for o in it.objects] == [[0, 5, 20, 25], [90, 40, 100, 50], [100, 50, 100, 50]]
    assert [(o.x, o.y, o.w, o.h) for o in it.objects] == [(0, 5, 20, 20), (90, 40, 10, 10), (100, 50, 0, 0)]
    assert it.pairs == [(1, 2), (3, 1)]


def test_items_carry_where_the_image_is_and_its_dataset(tmp_path):
    plan = make_run(tmp_path, [([img(7, [(1, PERSON, 0, 0, 5, 5), (2, 12, 0, 0, 5, 5)], file_name="a/b.jpg")],
                                [trip(7, 1, 2, "on", 0.9)])], vocabulary="coco")  # fmt: skip
    with pytest.raises(ValueError, match="image 7: category id 12 has no class key in the coco vocabulary"):
        items(RelationDataset([plan]))
    plan = make_run(
        tmp_path / "o",
        [([img(7, [(1, PERSON, 0, 0, 5, 5)], file_name="a/b.jpg")], [trip(7, 1, 1, "on", 0.9)])],
    )
    (it,) = items(RelationDataset([plan]))
    assert (it.file_name, it.dataset, it.data_split, it.width, it.height) == (
        "/imgs/train2017/a/b.jpg",
        "o365",
        "train2017",
        100,
        50,
    )


def test_rows_of_an_image_split_over_row_groups_make_one_image(tmp_path):
    # 7 rows of image 1 and 3 of image 2 in row groups of 3: image 1 spans three groups, image 2 two
    rows = [trip(1, 1, 2, f"r{i}", 0.9) for i in range(7)] + [trip(2, 1, 2, f"s{i}", 0.9) for i in range(3)]
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    plan = make_run(tmp_path, [([img(1, b), img(2, b)], rows)], row_group_size=3)
    assert pq.ParquetFile(RunSource(plan, "run0").triplets(0)).num_row_groups == 4
    got = items(RelationDataset([plan]))
    assert [(i.image_id, len(i.relationships)) for i in got] == [(1, 7), (2, 3)]
    # a file whose image rows are not contiguous is refused, naming the image
    bad = make_run(
        tmp_path / "bad",
        [
            (
                [img(1, b), img(2, b)],
                [trip(1, 1, 2, "a", 0.9), trip(2, 1, 2, "b", 0.9), trip(1, 1, 2, "c", 0.9)],
            )
        ],
    )
    with pytest.raises(ValueError, match="the rows of image 1 are not contiguous"):
        RelationDataset([bad])


def test_row_groups_below_eta_are_skipped_by_their_statistics(tmp_path, monkeypatch):
    rows = [trip(1, 1, 2, f"low{i}", 0.1) for i in range(4)] + [trip(2, 1, 2, "hi", 0.9)] * 2
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    plan = make_run(tmp_path, [([img(1, b), img(2, b)], rows)], row_group_size=2)
    read = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        read.append((i, tuple(columns or ())))
        return orig(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    got = items(RelationDataset([plan]))
    assert [i.image_id for i in got] == [2]
    # groups 0 and 1 (max p_relation 0.1) are never read beyond their image ids
    assert {c for i, c in read if i in (0, 1)} == {("image_id",)}


# ------------------------------------------------------------------------------------------------ VG files, mixing


def write_vg(path, images):
    path.write_text(json.dumps(images))
    return str(path)


def vg_image(image_id, rels, objects=None):
    objects = objects or [
        {"object_id": 1, "name": "man", "x": 0, "y": 0, "w": 10, "h": 10},
        {"object_id": 2, "name": "horse", "x": 5, "y": 5, "w": 10, "h": 10},
    ]
    return {"image_id": image_id, "file_name": f"images/{image_id}.png", "width": 40, "height": 30,
            "objects": objects, "relationships": rels}  # fmt: skip


def test_vg_rows_without_a_confidence_are_kept(tmp_path):
    vg = write_vg(tmp_path / "vg.json", [
        vg_image(10, [{"subject_id": 1, "object_id": 2, "predicate": "riding"}]),  # human: kept
        vg_image(11, [{"subject_id": 1, "object_id": 2, "predicate": "near", "confidence": 0.1}]),  # dropped
        vg_image(12, [{"subject_id": 1, "object_id": 2, "predicate": "on", "confidence": 0.2},
                      {"subject_id": 2, "object_id": 1, "predicate": "under", "p_subject": 0.5, "p_object": 0.5,
                       "p_relation": 0.5}]),  # confidence at eta: kept; factors: relation_only 0.5 kept, paper 0.125 not
        vg_image(13, []),
    ])  # fmt: skip
    got = items(RelationDataset([vg]))
    assert [i.image_id for i in got] == [10, 12]
    assert [r.predicate for r in got[1].relationships] == ["on", "under"]
    assert got[0].relationships[0].confidence is None and got[0].dataset == "vg"
    assert got[0].file_name == str(tmp_path / "images" / "10.png")
    paper = items(RelationDataset([vg], rule="paper"))
    assert [r.predicate for r in paper[1].relationships] == ["on"]
    bad = write_vg(
        tmp_path / "bad.json", [vg_image(5, [{"subject_id": 1, "object_id": 9, "predicate": "x"}])]
    )
    with pytest.raises(
        ValueError, match="image 5: relationship 1 -x-> 9 names an object that is not in the image"
    ):
        items(RelationDataset([bad]))


def one_behaviour_vg(tmp_path):
    """4 records: image 10's only relation is below eta (p_relation 0.1): dropped; image 11 (objects named by
    `names`, a list and a text) has a factor row at 0.6 (paper: 0.5 * 0.5 * 0.6 = 0.15) and a human row twice;
    image 12 has human rows, one pair twice; image 13 one row with `confidence` 0.25."""
    man = {"object_id": 1, "names": ["man", "person"], "x": 0, "y": 0, "w": 10, "h": 10}
    dog = {"object_id": 2, "names": "dog", "x": 5, "y": 5, "w": 10, "h": 10}
    return write_vg(tmp_path / "vg.json", [
        vg_image(10, [{"subject_id": 1, "object_id": 2, "predicate": "low", "p_relation": 0.1}]),
        vg_image(11, [{"subject_id": 1, "object_id": 2, "predicate": "chasing", "p_subject": 0.5, "p_object": 0.5,
                       "p_relation": 0.6},
                      {"subject_id": 1, "object_id": 2, "predicate": "near"},
                      {"subject_id": 1, "object_id": 2, "predicate": "near"}], objects=[man, dog]),
        vg_image(12, [{"subject_id": 1, "object_id": 2, "predicate": "on"},
                      {"subject_id": 1, "object_id": 2, "predicate": "on"},
                      {"subject_id": 2, "object_id": 1, "predicate": "under"}]),
        vg_image(13, [{"subject_id": 2, "object_id": 1, "predicate": "by", "confidence": 0.25}]),
    ])  # fmt: skip


def test_one_vg_behaviour_on_every_path_eta_names_duplicates_and_two_ranks(tmp_path):
    """The pre-training data (open_sources), RelationDataset and load_vg read a VG file the same way: eta applied,
    empty images dropped, `names` read, duplicates merged multi-hot, and ranks take contiguous blocks of the kept
    images: 3 kept (11, 12, 13) on 2 ranks -> rank 0 [0, 1), rank 1 [1, 3)."""
    from models.rlipv2.data import load_vg
    from models.rlipv2.pretrain_data import open_sources
    from models.rlipv2.pretrain_settings import PretrainSettings

    vg = one_behaviour_vg(tmp_path)
    assert [i.image_id for i in RelationDataset([vg])] == [11, 12, 13]
    assert [[i.image_id for i in RelationDataset([vg], rank=r, world_size=2)] for r in (0, 1)] == [
        [11],
        [12, 13],
    ]
    s = PretrainSettings()
    assert [[i.image_id for i in open_sources([vg], s, r, 2)] for r in (0, 1)] == [[11], [12, 13]]
    assert [i.image_id for i in load_vg(vg)] == [11, 12, 13]
    for got in (list(RelationDataset([vg])), list(open_sources([vg], s)), load_vg(vg)):
        a, b, c = got
        assert [o.name for o in a.objects] == ["man", "dog"] and a.object_texts == ["man", "dog"]
        assert [(r.predicate, r.confidence) for r in a.relationships] == [
            ("chasing", 0.6), ("near", None), ("near", None),
        ]  # fmt: skip
        assert a.pairs == [(1, 2)] and a.relation_texts == ["chasing", "near"] and a.pair_labels == [[1, 1]]
        assert b.pairs == [(1, 2), (2, 1)] and b.relation_texts == ["on", "under"]
        assert b.pair_labels == [[1, 0], [0, 1]]
        assert [(r.predicate, r.confidence) for r in c.relationships] == [("by", 0.25)]
    # relative: train.make_batch resolves it under the file's folder
    assert load_vg(vg)[0].file_name == "images/11.png"
    # eta 0.3 also drops image 13 (0.25); the paper rule drops "chasing" (0.15), image 11 stays by its "near" rows
    assert [i.image_id for i in open_sources([vg], PretrainSettings(eta=0.3))] == [11, 12]
    with pytest.raises(
        ValueError, match=r"record #0, image 10: relationship #0 has no p_subject, p_object .rule "
    ):
        load_vg(vg, rule="paper")  # image 10's row has p_relation alone: the paper rule cannot apply to it
    no10 = write_vg(tmp_path / "no10.json", json.loads(open(vg).read())[1:])
    paper = load_vg(no10, rule="paper")
    assert [r.predicate for r in paper[0].relationships] == ["near", "near"]
    # max_relations keeps the first rows in file order, duplicates counted
    (first,) = [i for i in open_sources([vg], PretrainSettings(max_relations=1)) if i.image_id == 11]
    assert [r.predicate for r in first.relationships] == ["chasing"]


@pytest.mark.parametrize(
    "record, message",
    [
        ([1, 2], r"record #0: is list, not a JSON object"),
        ({"image_id": 5}, r"record #0, image 5: has no 'file_name'"),
        (vg_image(5, [], objects=[{"object_id": 1, "x": 0, "y": 0, "w": 1, "h": 1}]),
         r"record #0, image 5: object 1 has no name \(`name` or `names`: None\)"),
        (vg_image(5, [], objects=[{"object_id": 1, "names": [], "x": 0, "y": 0, "w": 1, "h": 1}]),
         r"record #0, image 5: object 1 has no name"),
        (vg_image(5, [], objects=[{"object_id": 1, "name": "a", "x": 0, "y": 0, "w": -1, "h": 1}]),
         r"record #0, image 5: object 1 has w=-1.0, h=1.0; sizes must be >= 0"),
        (vg_image(5, [], objects=[{"object_id": 1, "name": "a", "x": "0", "y": 0, "w": 1, "h": 1}]),
         r"record #0, image 5: object 1: x is '0', not a finite number"),
        (vg_image(5, [{"subject_id": 1, "object_id": 2}]), r"record #0, image 5: relationship #0 has no 'predicate'"),
        (vg_image(5, [{"subject_id": 1, "object_id": 2, "predicate": "on", "p_relation": "high"}]),
         r"record #0, image 5: relationship #0 p_relation is 'high', not a finite number"),
        (vg_image(5, [{"subject_id": "1", "object_id": 2, "predicate": "on"}]),
         r"record #0, image 5: relationship #0: subject_id is '1', not an integer"),
        (dict(vg_image(5, []), objects=[{"object_id": 1, "name": "a", "x": 0, "y": 0, "w": 1, "h": 1}] * 2),
         r"record #0, image 5: repeats an object_id"),
    ],
)  # fmt: skip
def test_a_bad_vg_record_is_a_value_error_naming_the_file_and_the_record(tmp_path, record, message):
    from models.rlipv2.data import load_vg

    good = vg_image(4, [{"subject_id": 1, "object_id": 2, "predicate": "on"}])
    path = write_vg(tmp_path / "bad.json", [good, record])
    message = message.replace("record #0", "record #1")
    for read in (lambda: RelationDataset([path]), lambda: load_vg(path)):
        with pytest.raises(ValueError, match=rf"VG file .*bad\.json: {message}"):
            read()


def two_runs_and_vg(tmp_path):
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5), (3, CHAIR, 0, 0, 5, 5)]
    run_a = make_run(tmp_path / "a", [
        ([img(1, b), img(2, b)], [trip(1, 1, 2, "wearing", 0.9), trip(1, 1, 3, "on", 0.9), trip(2, 1, 3, "on", 0.1)]),
        ([img(3, b)], [trip(3, 1, 2, "wearing", 0.5)]),
    ], run_key="ra")  # fmt: skip
    run_b = make_run(tmp_path / "b", [([img(1, b[:2])], [trip(1, 2, 1, "on", 0.3)])], run_key="rb", vocabulary="coco",
                     dataset="coco")  # fmt: skip
    vg = write_vg(tmp_path / "vg.json", [vg_image(100, [{"subject_id": 1, "object_id": 2, "predicate": "riding"},
                                                         {"subject_id": 1, "object_id": 2, "predicate": "on"}])])  # fmt: skip
    return run_a, run_b, vg


def test_two_runs_and_a_vg_file_mix_in_order_with_fused_frequencies(tmp_path):
    run_a, run_b, vg = two_runs_and_vg(tmp_path)
    ds = RelationDataset([run_a, (run_b, "rb"), vg])
    got = items(ds)
    # run a: image 1 (image 2's only row is below eta), image 3; run b (coco): image 1; the VG image
    assert [(i.dataset, i.image_id) for i in got] == [("o365", 1), ("o365", 3), ("coco2017", 1), ("vg", 100)]
    assert got[2].object_texts == ["person", "airplane"]  # coco category ids 1, 5
    assert ds.reader.source_lengths() == [2, 1, 1]
    f = ds.class_frequencies()
    # per source, by count (ties first seen): a: wearing 2, on 1 | person 2, hat 2, chair 2; b: on 1 | person 1,
    # airplane 1; vg: riding 1, on 1 | man 1, horse 1. Fused in that order, re-sorted by count (stable):
    assert list(f["relationship_freq"].items()) == [("on", 3), ("wearing", 2), ("riding", 1)]
    assert list(f["object_freq"].items()) == [
        ("person", 3), ("hat", 2), ("chair", 2), ("airplane", 1), ("man", 1), ("horse", 1),
    ]  # fmt: skip
    assert f["relationship_names"] == ["on", "wearing", "riding"]
    # cached: a second call reads nothing
    ds.reader = None
    assert ds.class_frequencies() is f


def test_class_frequencies_cache_file(tmp_path):
    run_a, run_b, vg = two_runs_and_vg(tmp_path)
    cache = tmp_path / "freq.json"
    f1 = RelationDataset([run_a, vg]).class_frequencies(cache)
    assert json.loads(cache.read_text())["frequencies"] == f1
    ds = RelationDataset([run_a, vg])
    ds.reader.iter_range = None  # a cache hit must not read the data
    assert ds.class_frequencies(cache) == f1
    assert list(ds.class_frequencies(cache)["object_freq"]) == list(f1["object_freq"])
    # other settings: not the cached entry (eta 0.6 drops image 3's "wearing" 0.5: a: wearing 1, on 1; vg: riding 1, on 1)
    f6 = RelationDataset([run_a, vg], eta=0.6).class_frequencies(cache)
    assert list(f6["relationship_freq"].items()) == [("on", 2), ("wearing", 1), ("riding", 1)]


# ------------------------------------------------------------------------------------------------ sharding


def many_images_run(tmp_path, n_shards=3, per_shard=7):
    shards = []
    for k in range(n_shards):
        ims, rows = [], []
        for j in range(per_shard):
            i = 100 * k + j
            ims.append(img(i, [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]))
            # every third image has only rows below eta; others 1..3 rows
            p = 0.1 if j % 3 == 2 else 0.9
            rows += [trip(i, 1, 2, f"r{x}", p) for x in range(1 + j % 3)]
        shards.append((ims, rows))
    return make_run(tmp_path, shards, row_group_size=4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_cover_every_image_exactly_once(tmp_path, world_size):
    plan = many_images_run(tmp_path)
    vg = write_vg(
        tmp_path / "vg.json",
        [vg_image(1000 + i, [{"subject_id": 1, "object_id": 2, "predicate": "on"}]) for i in range(3)],
    )
    expected = [(i.dataset, i.image_id) for i in items(RelationDataset([plan, vg]))]
    # by hand: 3 shards x images j = 0, 1, 3, 4, 6 (j % 3 != 2) + 3 VG images
    assert expected == [("o365", 100 * k + j) for k in range(3) for j in (0, 1, 3, 4, 6)] + [
        ("vg", 1000 + i) for i in range(3)
    ]
    seen, sizes = [], []
    for rank in range(world_size):
        ds = RelationDataset([plan, vg], rank=rank, world_size=world_size)
        got = [(i.dataset, i.image_id) for i in ds]
        assert len(got) == len(ds)
        sizes.append(len(got))
        seen += got
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match=r"rank 4 is not in \[0, world_size 4\)"):
        RelationDataset([plan], rank=4, world_size=4)


def test_ranks_and_dataloader_workers_together_read_every_image_once(tmp_path):
    import torch

    plan = many_images_run(tmp_path)
    expected = [i.image_id for i in RelationDataset([plan])]
    seen = []
    for rank in range(3):
        ds = RelationDataset([plan], rank=rank, world_size=3)
        seen += [
            i.image_id
            for i in torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"
            )
        ]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen)) == 15


def test_dataloader_workers_split_a_rank_and_decode_the_images(tmp_path):
    import torch
    from PIL import Image

    ims_dir = tmp_path / "images"
    ims_dir.mkdir()
    for i in range(5):
        Image.new("RGB", (40 + i, 30)).save(ims_dir / f"{1000 + i}.png")
    vg = write_vg(
        tmp_path / "vg.json",
        [vg_image(1000 + i, [{"subject_id": 1, "object_id": 2, "predicate": "on"}]) for i in range(5)],
    )
    ds = RelationDataset([vg], rank=0, world_size=1, decode=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = list(loader)
    assert sorted(i.image_id for i in got) == [1000 + i for i in range(5)]
    assert all(i.image.size == (40 + i.image_id - 1000, 30) and i.image.mode == "RGB" for i in got)
    # a transform runs in the worker too
    ds = RelationDataset([vg], transform=lambda im, item: im.size[0] * 10 + item.width)
    assert sorted(i.image for i in ds) == [400 + 40, 410 + 40, 420 + 40, 430 + 40, 440 + 40]


def test_shuffle_buffer_is_a_seeded_permutation_per_epoch(tmp_path):
    plan = many_images_run(tmp_path)
    file_order = [i.image_id for i in RelationDataset([plan])]
    ds = RelationDataset([plan], shuffle_buffer=4, seed=3)
    e0 = [i.image_id for i in ds]
    assert [i.image_id for i in ds] == e0  # the same epoch: the same order
    ds.set_epoch(1)
    e1 = [i.image_id for i in ds]
    assert sorted(e0) == sorted(e1) == sorted(file_order)
    assert len({tuple(file_order), tuple(e0), tuple(e1)}) == 3
    assert [i.image_id for i in RelationDataset([plan], shuffle_buffer=4, seed=3)] == e0  # a rerun: the same


# ------------------------------------------------------------------------------------------------ finished, settings


def test_a_run_that_is_not_finished_is_refused_naming_what_is_missing(tmp_path):
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    shards = [([img(i, b)], [trip(i, 1, 2, "on", 0.9)]) for i in range(3)]
    plan = make_run(tmp_path, shards, finished=False)
    with pytest.raises(
        RunNotFinished, match=r"run run0 .* is not finished: 3 of 3 shards have no 'write' record \[0, 1, 2\]"
    ):
        RelationDataset([plan])
    # two shards written, no statistics yet
    src = RunSource(plan, "run0")
    for k in (0, 2):
        Ledger(src.layout).record_done(Unit("write", k), {})
    with pytest.raises(
        RunNotFinished,
        match=r"1 of 3 shards have no 'write' record \[1\]; the run statistics .* are not written",
    ):
        RelationDataset([plan])
    Ledger(src.layout).record_done(Unit("write", 1), {})
    write_json(src.fs, src.layout.run_stats, {})
    assert len(RelationDataset([plan])) == 3


def test_reading_at_a_looser_eta_or_rule_than_the_run_needs_its_rejects(tmp_path):
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    reject = {"image_id": 1, "subject_ann_id": 1, "object_ann_id": 2, "subject_label": "a", "object_label": "b",
              "relation": "x", "confidence": 0.1, "p_subject": 0.5, "p_object": 0.5, "p_relation": 0.4,
              "caption_ids": [0], "reason": "below_eta", "run_key": "k"}  # fmt: skip
    shards = [([img(1, b)], [trip(1, 1, 2, "on", 0.9)])]
    plan = make_run(tmp_path, shards, rule="paper", eta=0.2, rejects={0: [reject]})
    # p_relation 0.4 >= 0.2: reading relation_only at 0.2 would want that rejected row
    with pytest.raises(
        ValueError,
        match=r"kept rows with rule 'paper' >= 0.2; reading at rule 'relation_only' >= 0.2 needs 1 row\(s\) it rejected",
    ):
        RelationDataset([plan], rule="relation_only")
    assert len(RelationDataset([plan], rule="relation_only", eta=0.5)) == 1  # 0.4 < 0.5: none is wanted
    assert (
        len(RelationDataset([plan], rule="paper", eta=0.3)) == 1
    )  # stricter than the run: no look at rejects
    with pytest.raises(ValueError, match=r"needs 1 row\(s\)"):
        RelationDataset([plan], rule="paper", eta=0.1)  # product 0.1 >= 0.1


def test_sources_are_named_in_the_ways_reltag_prints_them(tmp_path):
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    plan = make_run(tmp_path, [([img(1, b)], [trip(1, 1, 2, "on", 0.9)])])
    for form in (
        plan,
        posixpath.join(plan, "runs", "run0.json"),
        posixpath.join(plan, "triplets", "run0"),
        (plan, "run0"),
    ):
        s = resolve_source(form)
        assert isinstance(s, RunSource) and s.run_key == "run0", form
    make_run(
        tmp_path, [([img(1, b)], [trip(1, 1, 2, "on", 0.9)])], run_key="run1"
    )  # same dataset 't', another plan
    with pytest.raises(FileNotFoundError, match="source .*nowhere does not exist"):
        resolve_source(str(tmp_path / "nowhere"))
    two = tmp_path / "t" / "plan-run0"
    os.link(two / "runs" / "run0.json", two / "runs" / "run9.json")
    with pytest.raises(ValueError, match=r"holds 2 runs \['run0', 'run9'\]; name one"):
        resolve_source(str(two))


def test_memory_filesystem_run():
    import uuid

    root = f"memory://rel-{uuid.uuid4().hex[:8]}"
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    plan = make_run(root, [([img(1, b)], [trip(1, 1, 2, "on", 0.9)])])
    assert plan.startswith("/rel-")  # the layout's base has no protocol; the source keeps it
    (it,) = items(RelationDataset([f"{root}/t/plan-run0"]))
    assert it.pairs == [(1, 2)]


# ------------------------------------------------------------------------------------------------ make_batch


def test_make_batch_takes_the_items_unchanged():
    """train.make_batch builds its targets from the items as they are (it reads only the model's config), and its
    multi-hot targets (pairs sorted) say what the items' merged pairs (first seen first) say."""
    from types import SimpleNamespace

    import torch

    from models.rlipv2.train import make_batch, tiny_config

    vg = os.path.join(os.path.dirname(__file__), "..", "examples", "vg_tiny", "relationships.json")
    ds = RelationDataset([vg])
    got = items(ds)
    freq = ds.class_frequencies()
    preds = freq["relationship_names"]
    model = SimpleNamespace(cfg=tiny_config(entity_names=freq["object_names"]))
    batch = make_batch(model, got, None, preds, torch.Generator().manual_seed(0), denoise=False)
    assert batch.n_pairs == [len(i.pairs) for i in got] and batch.pixels.shape[0] == len(got) == 4
    for b, it in enumerate(got):
        ordered = sorted(it.pairs)
        for pair, labels in zip(it.pairs, it.pair_labels):
            want = torch.zeros(len(preds))
            for text, on in zip(it.relation_texts, labels):
                want[preds.index(text)] = on
            assert torch.equal(batch.tgt_rels[b, ordered.index(pair)], want), (it.image_id, pair)


def test_reference_item_is_a_pure_function_of_the_record():
    from storage.relations import ImageRelations, RelBox, RelRow

    rec = ImageRelations("s", 1, "f", 10, 10, "vg", "", None,
                         [RelBox(5, -1, "a", 0, 0, 4, 4), RelBox(6, -1, "b", 1, 1, 4, 4)],
                         [RelRow(5, 6, "x", None), RelRow(6, 5, "y", 0.3), RelRow(5, 6, "y", 0.3)])  # fmt: skip
    it = reference_item(rec, max_relations=100)
    assert it.pairs == [(5, 6), (6, 5)] and it.relation_texts == ["x", "y"]
    assert it.pair_labels == [[1, 1], [0, 1]]
    assert [(r.subject_id, r.predicate, r.confidence) for r in it.relationships] == [
        (5, "x", None),
        (6, "y", 0.3),
        (5, "y", 0.3),
    ]
    assert rec.relations[0].relation == "x" and len(rec.relations) == 3  # the record is not changed
