"""Reference mode end to end: a detection file -> plan -> match candidates and tagger slot groups, in the order
and with the box/name semantics of the RLIPv2 reference scripts.

The expected rows below were written by hand from the reference code, not by running reltag:
  - `bboxes_names` (BLIP_coco/o365_caption_helper.transform_BLIP_sngs_to_verb_tagger_input_format): class
    names of *every* annotation of the image, in annotation-file order, de-duplicated; MatchWithGTbboxes loops
    over them and the last class whose paraphrase is a substring of the lower-cased span wins;
  - boxes (CocoDetection + ConvertCocoPolysToMask): the image's annotations in file order (pycocotools'
    imgToAnns), crowd ones removed, xywh -> xyxy clamped to the image, kept when x1 > x0 and y1 > y0;
  - entries: for pair in permutations(range(len(boxes)), 2), for each (subject name, relation, object name)
    triplet of the image in first-seen order (captions in order, relations in order, de-duplicated), one
    (pair, relation) entry when both names equal the boxes' names;
  - groups: the entries cut every 100 (num_queries 200 // 2), texts de-duplicated in first-seen order.
"""

from __future__ import annotations

import json

import pytest

from models.matcher import Vocabulary
from storage.layout import RunLayout, shard_records
from storage.records import Box, Candidate, ImageRecord, ParsedRelation
from tasks.config import MatchConfig, PlanConfig
from tasks.stages.match import SlotGroup, match_batch, reference_slot_groups
from tasks.stages.plan import plan_shards

# COCO ids (models/data/synonyms/coco_object_names.json)
PERSON, BENCH, DOG, FRISBEE, HOT_DOG = 1, 15, 18, 34, 58
CATS = [
    {"id": PERSON, "name": "person"},
    {"id": BENCH, "name": "bench"},
    {"id": DOG, "name": "dog"},
    {"id": FRISBEE, "name": "frisbee"},
    {"id": HOT_DOG, "name": "hot dog"},
]


def _ann(a, image, cat, bbox, crowd=0):
    return {"id": a, "image_id": image, "category_id": cat, "bbox": list(bbox), "iscrowd": crowd}


# Image 7 (640x480) interleaved with image 3 in the file; neither lists its annotations in id order.
ANNOTATIONS = [
    _ann(31, 7, PERSON, (10, 10, 50, 100)),  # file 0
    _ann(12, 7, DOG, (100, 200, 80, 60)),  # file 1
    _ann(40, 3, PERSON, (0, 0, 10, 10)),  # file 2
    _ann(5, 7, FRISBEE, (300, 50, 20, 20), crowd=1),  # file 3: crowd -> a name, never a box
    _ann(22, 7, PERSON, (600, 400, 100, 100)),  # file 4: leaves the image -> clamped to 600,400,40,80
    _ann(3, 7, HOT_DOG, (50, 50, 0, 30)),  # file 5: zero width -> a name, never a box
    _ann(18, 7, DOG, (700, 10, 20, 20)),  # file 6: right of the image -> empty after clamping, dropped
    _ann(41, 3, PERSON, (20, 20, 10, 10)),  # file 7
    _ann(9, 7, BENCH, (200, 300, 150, 80)),  # file 8
    _ann(2, 3, DOG, (5, 5, 5, 5)),  # file 9
]
IMAGES = [
    {"id": 7, "file_name": "7.jpg", "width": 640, "height": 480},
    {"id": 3, "file_name": "3.jpg", "width": 100, "height": 100},
]


def _rel(image, caption, s, rel, o):
    return ParsedRelation(image, caption, s, s.split()[-1], rel, rel, o, o.split()[-1])


RELATIONS = [
    # image 7, caption 0
    _rel(7, 0, "a man", "playing with", "a dog"),  # (person, playing with, dog)
    # "a hot dog" hits dog ("dog") and hot dog ("hot dog"); hot dog comes later in bboxes_names (its only
    # annotation has zero width), so it wins and the triplet has no box: no entry. Without the degenerate
    # annotation among the names this would be (dog, on, bench).
    _rel(7, 0, "a hot dog", "on", "a bench"),
    # caption 1
    _rel(7, 1, "a woman", "throwing", "a frisbee"),  # frisbee: only a crowd annotation -> no entry
    _rel(7, 1, "a dog", "sitting on", "a bench"),  # (dog, sitting on, bench)
    _rel(7, 1, "a man", "playing with", "a puppy"),  # the same triplet as caption 0's ("pup" -> dog)
    # caption 2
    _rel(7, 2, "a man", "next to", "a man"),  # (person, next to, person)
    _rel(7, 2, "a man", "sitting on", "a bench"),  # (person, sitting on, bench)
    _rel(7, 2, "a dog", "next to", "a man"),  # (dog, next to, person)
    _rel(7, 2, "a man", "behind", "a dog"),  # (person, behind, dog): after "playing with", not sorted
    # "a frisbee dog": dog, then frisbee (the crowd class, later in the names) wins -> no entry
    _rel(7, 2, "a frisbee dog", "lying on", "a bench"),
    # image 3, caption 0
    _rel(3, 0, "a dog", "near", "a man"),
]

# Image 7's boxes in the reference: file order, crowd 5 out, 3 (zero width) and 18 (empty after clamping)
# dropped -> [31 person, 12 dog, 22 person, 9 bench]. Triplets in first-seen order: (person, playing with,
# dog), (dog, sitting on, bench), (person, next to, person), (person, sitting on, bench), (dog, next to,
# person), (person, behind, dog). permutations over the 4 boxes:
WANT = [
    # (image, subject ann, object ann, relation, caption ids)
    (7, 31, 12, "playing with", [0, 1]),  # (0, 1)
    (7, 31, 12, "behind", [2]),
    (7, 31, 22, "next to", [2]),  # (0, 2)
    (7, 31, 9, "sitting on", [2]),  # (0, 3)
    (7, 12, 31, "next to", [2]),  # (1, 0)
    (7, 12, 22, "next to", [2]),  # (1, 2)
    (7, 12, 9, "sitting on", [1]),  # (1, 3)
    (7, 22, 31, "next to", [2]),  # (2, 0)
    (7, 22, 12, "playing with", [0, 1]),  # (2, 1)
    (7, 22, 12, "behind", [2]),
    (7, 22, 9, "sitting on", [2]),  # (2, 3); the bench (3, *) is no triplet's subject
    # image 3: boxes in file order [40 person, 41 person, 2 dog]; (dog, near, person)
    (3, 2, 40, "near", [0]),  # (2, 0)
    (3, 2, 41, "near", [0]),  # (2, 1)
]


@pytest.fixture(scope="module")
def coco():
    return Vocabulary.from_categories(CATS, "coco")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    path = tmp / "det.json"
    path.write_text(json.dumps({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATS}))
    layout = RunLayout(str(tmp / "out"), "ds", "key")
    plan_shards(str(path), layout, PlanConfig())
    return shard_records(layout, 0)


def _rows(cands):
    return [(c.image_id, c.subject_ann_id, c.object_ann_id, c.relation, c.caption_ids) for c in cands]


def test_plan_keeps_what_reference_mode_needs(planned):
    im7, im3 = planned
    # validated boxes are unchanged: annotation-id order, crowd/zero-area/empty dropped, the rest clipped
    assert [b.ann_id for b in im7.boxes] == [9, 12, 22, 31]
    b22 = im7.boxes[2]
    assert (b22.x, b22.y, b22.w, b22.h) == (600.0, 400.0, 40.0, 80.0)  # clamped as the reference does
    assert im7.box_file_index == [8, 1, 4, 0]
    assert im7.class_order == [PERSON, DOG, FRISBEE, HOT_DOG, BENCH]  # the reference's bboxes_names order
    assert [b.ann_id for b in im3.boxes] == [2, 40, 41] and im3.box_file_index == [9, 2, 7]
    assert im3.class_order == [PERSON, DOG]


def test_reference_candidates_reproduce_the_reference(planned, coco):
    out = match_batch(planned, RELATIONS, MatchConfig(vocabulary="coco", mode="reference"), coco)
    assert _rows(out.candidates) == WANT
    assert all(c.subject_rule == c.object_rule == "reference" for c in out.candidates)
    c = out.candidates[0]
    assert (c.subject_label, c.object_label, c.subject_synonym, c.object_synonym) == (
        "person",
        "dog",
        "man",
        "dog",
    )
    # the three relations whose class has no usable box matched (so they count) but made no candidate
    assert out.stats["relations_matched"] == 11 and out.stats["pairs"] == 11


def test_correct_mode_is_unchanged_by_the_file_order(planned, coco):
    # correct mode: boxes in id order [9, 12, 22, 31], texts sorted; "a hot dog" is a hot dog, which has no
    # box here (not in the image), and "a frisbee dog" is a dog by its head noun
    out = match_batch(planned, RELATIONS, MatchConfig(vocabulary="coco"), coco)
    assert _rows(out.candidates) == [
        (7, 12, 9, "lying on", [2]),
        (7, 12, 9, "sitting on", [1]),
        (7, 12, 22, "next to", [2]),
        (7, 12, 31, "next to", [2]),
        (7, 22, 9, "sitting on", [2]),
        (7, 22, 12, "behind", [2]),
        (7, 22, 12, "playing with", [0, 1]),
        (7, 22, 31, "next to", [2]),
        (7, 31, 9, "sitting on", [2]),
        (7, 31, 12, "behind", [2]),
        (7, 31, 12, "playing with", [0, 1]),
        (7, 31, 22, "next to", [2]),
        (3, 2, 40, "near", [0]),
        (3, 2, 41, "near", [0]),
    ]


def test_reference_slot_groups_pinned(planned, coco):
    cands = match_batch(planned, RELATIONS, MatchConfig(vocabulary="coco", mode="reference"), coco).candidates
    (g7, g3) = reference_slot_groups(cands)
    assert g7 == SlotGroup(
        image_id=7,
        slots=[
            (31, 12),
            (31, 12),
            (31, 22),
            (31, 9),
            (12, 31),
            (12, 22),
            (12, 9),
            (22, 31),
            (22, 12),
            (22, 12),
            (22, 9),
        ],
        slot_text=[0, 1, 2, 3, 2, 2, 3, 2, 0, 1, 3],
        texts=["playing with", "behind", "next to", "sitting on"],
    )
    assert g3 == SlotGroup(3, [(2, 40), (2, 41)], [0, 0], ["near"])
    assert reference_slot_groups(cands, n_q=4) == [
        SlotGroup(
            7,
            [(31, 12), (31, 12), (31, 22), (31, 9)],
            [0, 1, 2, 3],
            ["playing with", "behind", "next to", "sitting on"],
        ),
        SlotGroup(7, [(12, 31), (12, 22), (12, 9), (22, 31)], [0, 0, 1, 0], ["next to", "sitting on"]),
        SlotGroup(7, [(22, 12), (22, 12), (22, 9)], [0, 1, 2], ["playing with", "behind", "sitting on"]),
        SlotGroup(3, [(2, 40), (2, 41)], [0, 0], ["near"]),
    ]


def _cand(image_id, s, o, rel):
    return Candidate(
        image_id, s, o, 1, 1, "person", "person", rel, rel, [0], 1, "reference", "man", "reference", "man"
    )


def test_slot_groups_split_a_pair_over_groups_and_keep_first_seen_texts():
    # 40 pairs x 3 texts = 120 entries -> 100 + 20; pair 33 (entries 99, 100, 101) straddles the cut
    texts = ["on", "holding", "above"]
    cands = [_cand(1, 100 + k, 200 + k, t) for k in range(40) for t in texts]
    g0, g1 = reference_slot_groups(cands)
    assert len(g0.slots) == 100 and len(g1.slots) == 20
    assert (
        g0.slots[:3] == [(100, 200)] * 3 and g0.slots[-1] == (133, 233) and g1.slots[:2] == [(133, 233)] * 2
    )
    assert g0.texts == ["on", "holding", "above"] and g0.slot_text[:6] == [0, 1, 2, 0, 1, 2]
    assert g1.texts == ["holding", "above", "on"] and g1.slot_text[:5] == [0, 1, 2, 0, 1]
    assert [g1.texts[i] for i in g1.slot_text] == [c.relation for c in cands[100:]]
    # exactly 100 entries: one group (the reference's trailing empty group gives no slot and is not made)
    assert [len(g.slots) for g in reference_slot_groups(cands[:100])] == [100]


def test_slot_groups_per_image_even_when_interleaved():
    cands = [_cand(1, 1, 2, "on"), _cand(2, 5, 6, "near"), _cand(1, 2, 1, "under"), _cand(1, 1, 2, "near")]
    assert reference_slot_groups(cands, n_q=2) == [
        SlotGroup(1, [(1, 2), (2, 1)], [0, 1], ["on", "under"]),
        SlotGroup(1, [(1, 2)], [0], ["near"]),
        SlotGroup(2, [(5, 6)], [0], ["near"]),
    ]
    assert reference_slot_groups([]) == []


@pytest.mark.parametrize("n_q", [0, -3, 2.5, True])
def test_slot_groups_reject_bad_n_q(n_q):
    with pytest.raises(ValueError, match="n_q must be a positive int"):
        reference_slot_groups([], n_q)


def test_reference_mode_needs_the_file_order(coco):
    im = ImageRecord(7, "7.jpg", 640, 480, 0, [Box(1, PERSON, "person", 0, 0, 5, 5)])
    cfg = MatchConfig(vocabulary="coco", mode="reference")
    with pytest.raises(ValueError, match=r"needs image 7's annotation-file order"):
        match_batch([im], [], cfg, coco)
    im.box_file_index, im.class_order = [0, 1], [PERSON]
    with pytest.raises(ValueError, match="1 boxes but 2 box_file_index"):
        match_batch([im], [], cfg, coco)
    im.box_file_index, im.class_order = [0], [DOG]
    with pytest.raises(ValueError, match=r"box categories \[1\] are not in its class_order \[18\]"):
        match_batch([im], [], cfg, coco)
    # correct mode does not need it
    im.box_file_index = im.class_order = None
    assert match_batch([im], [], MatchConfig(vocabulary="coco"), coco).candidates == []
