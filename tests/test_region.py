"""Dense captioning on pairwise union regions (tasks/stages/region.py): the crop, beam search on tiny BLIP, matching
to the captioned pair only, de-duplication against the match stage, quarantine, keys, and the flow (off by default,
resume mid-stage)."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.matcher import Vocabulary
from storage.records import Box, Candidate, ImageRecord
from tasks.config import MatchConfig, ParseConfig, PipelineConfig
from tasks.run import registry
from tasks.run.context import clear_process_resources
from tasks.run.registry import chain
from tasks.stages import region as region_mod
from tasks.stages.region import RegionConfig, merge_region_candidates, region_batch, union_crop, union_pairs

PERSON, HORSE, DOG = 1, 79, 93  # Objects365 ids (examples/sample_detections.json)


class Scripted:
    """A captioner that writes a fixed caption per pair (by the pair's two annotation ids) and records what it was
    given: the crops, and how many crops each call had."""

    needs_pixels = True
    name = "scripted"
    revision = "scripted-1"

    def __init__(self, texts: dict[frozenset, str], default: str = "a picture"):
        self.texts, self.default = texts, default
        self.crops: list[tuple[tuple[int, int], Image.Image]] = []
        self.calls: list[int] = []

    def sampling(self) -> dict:
        return {"mode": "beam", "num_beams": 3}

    def caption(self, images, pixels, seed):
        self.calls.append(len(images))
        out = []
        for im, px in zip(images, pixels, strict=True):
            self.crops.append((tuple(b.ann_id for b in im.boxes), px))
            out.append([self.texts.get(frozenset(b.ann_id for b in im.boxes), self.default)])
        return out


@pytest.fixture(scope="module")
def o365():
    return Vocabulary.load("o365")


def _image(root, image_id=1, size=(200, 100), name=None) -> ImageRecord:
    """A drawn image (every pixel distinct enough to pin a crop) with a person, a horse and a dog box."""
    name = name or f"im{image_id}.png"
    w, h = size
    im = Image.new("RGB", size)
    im.putdata([((3 * x) % 256, (5 * y) % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    im.save(os.path.join(root, name))
    boxes = [
        Box(11, PERSON, "Person", 10.0, 20.0, 30.0, 40.0),
        Box(12, HORSE, "Horse", 50.0, 5.0, 20.0, 10.0),
        Box(13, DOG, "Dog", 120.0, 50.0, 30.0, 30.0),
    ]
    return ImageRecord(image_id, name, w, h, 0, boxes, [0, 1, 2], [PERSON, HORSE, DOG])


def _cand(
    image_id, s, o, rel, s_cat=PERSON, o_cat=HORSE, s_lab="Person", o_lab="Horse", ids=(0,)
) -> Candidate:
    return Candidate(
        image_id, s, o, s_cat, o_cat, s_lab, o_lab, rel, rel, list(ids), len(ids), "name", "", "name", ""
    )


def _run(images, candidates, captioner, root, o365, **cfg):
    return region_batch(
        images, candidates, captioner, str(root), RegionConfig(enabled=True, **cfg), ParseConfig(),
        MatchConfig(), o365,
    )  # fmt: skip


def test_the_crop_is_the_union_box_of_the_pair(tmp_path, o365):
    im = _image(tmp_path)
    cap = Scripted({})
    out = _run([im], [_cand(1, 11, 12, "near")], cap, tmp_path, o365)
    # person (10, 20, 30, 40) and horse (50, 5, 20, 10): x 10..70, y 5..60
    (row,) = out.rows
    assert (row.box_a_ann_id, row.box_b_ann_id, row.union_box) == (11, 12, [10.0, 5.0, 60.0, 55.0])
    ((ids, crop),) = cap.crops
    assert ids == (11, 12) and crop.size == (60, 55)
    full = Image.open(tmp_path / "im1.png").convert("RGB")
    assert crop.tobytes() == full.crop((10, 5, 70, 60)).tobytes()
    # fractional boxes widen to whole pixels; a box leaving the image is clamped
    a, b = Box(1, 1, "a", 0.5, 1.2, 2.0, 2.0), Box(2, 1, "b", 150.0, 90.0, 80.0, 30.0)
    assert union_crop(a, b, 200, 100) == (0, 1, 200, 100)
    assert (
        union_crop(Box(1, 1, "a", 210.0, 0.0, 5.0, 5.0), Box(2, 1, "b", 205.0, 3.0, 5.0, 5.0), 200, 100)
        is None
    )


def test_both_orders_are_one_union_captioned_once_in_the_first_orientation(tmp_path, o365):
    im = _image(tmp_path)
    cands = [
        _cand(1, 12, 11, "near"),
        _cand(1, 11, 12, "on"),
        _cand(1, 11, 13, "with", o_cat=DOG, o_lab="Dog"),
    ]
    assert union_pairs(cands) == {1: [(12, 11), (11, 13)]}
    cap = Scripted({})
    out = _run([im], cands, cap, tmp_path, o365)
    assert [(r.box_a_ann_id, r.box_b_ann_id, r.caption_id) for r in out.rows] == [(12, 11, -1), (11, 13, -2)]
    assert out.stats["region_captions"] == 2 and out.stats["pairs"] == 2


def test_relations_naming_the_pairs_classes_become_candidates_of_that_pair_only(tmp_path, o365):
    im = _image(tmp_path)
    cap = Scripted(
        {
            frozenset({11, 12}): "a man riding a horse",  # person -> horse: the pair as met
            frozenset(
                {11, 13}
            ): "a dog next to a horse",  # dog is the pair's, horse is the image's, not the pair's
        }
    )
    cands = [_cand(1, 11, 12, "near"), _cand(1, 11, 13, "with", o_cat=DOG, o_lab="Dog")]
    out = _run([im], cands, cap, tmp_path, o365)
    got = [
        (r.box_a_ann_id, r.box_b_ann_id, r.subject_ann_id, r.object_ann_id, r.relation, r.is_new)
        for r in out.rows
    ]
    assert got == [(11, 12, 11, 12, "riding", True), (11, 13, None, None, None, None)]
    assert out.rows[1].text == "a dog next to a horse" and out.rows[1].n_relations == 1
    assert out.stats["entities_unmatched"] == {"class_not_in_pair": 1}  # "horse": the image's, not the pair's
    assert sum(out.stats["relations_unmatched"].values()) == 1
    assert out.stats["new_candidates"] == 1 and out.stats["new_pairs"] == 0  # (11, 12) was a match pair


def test_reference_mode_matches_against_the_pairs_classes_only_too(tmp_path, o365):
    im = _image(tmp_path)
    cap = Scripted(
        {frozenset({11, 12}): "a man riding a horse", frozenset({11, 13}): "a dog next to a horse"}
    )
    cands = [_cand(1, 11, 12, "near"), _cand(1, 11, 13, "with", o_cat=DOG, o_lab="Dog")]
    out = region_batch(
        [im], cands, cap, str(tmp_path), RegionConfig(enabled=True), ParseConfig(), MatchConfig(mode="reference"),
        o365,
    )  # fmt: skip
    got = [(r.box_a_ann_id, r.box_b_ann_id, r.subject_ann_id, r.object_ann_id, r.relation) for r in out.rows]
    assert got == [(11, 12, 11, 12, "riding"), (11, 13, None, None, None)]
    assert {r.subject_rule for r in out.rows if r.relation} == {"reference"}


def test_the_reversed_orientation_is_a_candidate_of_the_reversed_pair(tmp_path, o365):
    im = _image(tmp_path)
    cap = Scripted({frozenset({11, 12}): "a horse standing next to a man"})
    out = _run([im], [_cand(1, 11, 12, "near")], cap, tmp_path, o365)
    ((r,),) = [out.rows]
    assert (r.subject_ann_id, r.object_ann_id, r.subject_label, r.object_label) == (12, 11, "Horse", "Person")
    assert r.relation == "next to" and r.is_new and out.stats["new_pairs"] == 1  # (12, 11) is a new pair
    merged, added = merge_region_candidates([_cand(1, 11, 12, "near")], out.rows)
    assert added == 1 and (merged[1].subject_ann_id, merged[1].object_ann_id, merged[1].caption_ids) == (
        12,
        11,
        [-1],
    )


def test_a_region_candidate_the_match_stage_has_adds_its_caption_not_a_row(tmp_path, o365):
    im = _image(tmp_path)
    other = _image(tmp_path, 2, name="im2.png")
    cap = Scripted({frozenset({11, 12}): "a man riding a horse"})
    match = [_cand(1, 11, 12, "riding", ids=(0, 3)), _cand(1, 11, 13, "with", o_cat=DOG, o_lab="Dog"),
             _cand(2, 11, 12, "near")]  # fmt: skip
    out = _run([im, other], match, cap, tmp_path, o365)
    riding = [r for r in out.rows if r.relation == "riding"]
    assert [(r.image_id, r.is_new) for r in riding] == [(1, False), (2, True)]
    assert out.stats["confirmed_candidates"] == 1 and out.stats["new_candidates"] == 1
    merged, added = merge_region_candidates(match, out.rows)
    assert added == 1
    assert [
        (c.image_id, c.subject_ann_id, c.object_ann_id, c.relation, c.caption_ids, c.n_captions)
        for c in merged
    ] == [
        (1, 11, 12, "riding", [-1, 0, 3], 3),  # the union caption joins the image's captions 0 and 3
        (1, 11, 13, "with", [0], 1),
        (2, 11, 12, "near", [0], 1),
        (2, 11, 12, "riding", [-1], 1),  # new: after the last candidate of its image
    ]
    assert match[0].caption_ids == [0, 3]  # the match stage's rows are not changed in place


def test_crops_are_captioned_in_micro_batches(tmp_path, o365):
    ims = [_image(tmp_path, i, name=f"im{i}.png") for i in (1, 2, 3)]
    cands = [c for i in (1, 2, 3) for c in (_cand(i, 11, 12, "a"), _cand(i, 11, 13, "b", o_cat=DOG, o_lab="Dog"),
                                            _cand(i, 12, 13, "c", s_cat=HORSE, o_cat=DOG))]  # fmt: skip
    cap = Scripted({})
    out = _run(ims, cands, cap, tmp_path, o365, batch_size=4)
    assert cap.calls == [4, 4, 1] and out.stats["generate_calls"] == 3 and out.stats["region_captions"] == 9
    capped = _run(ims, cands, Scripted({}), tmp_path, o365, max_pairs=2)
    assert capped.stats["region_captions"] == 6 and capped.stats["pairs_beyond_cap"] == 3
    assert [r.caption_id for r in capped.rows if r.image_id == 1] == [-1, -2]


def test_an_empty_union_and_an_unreadable_image_are_quarantined_with_the_reason(tmp_path, o365):
    good = _image(tmp_path)
    outside = _image(tmp_path, 2, name="im2.png")
    outside.boxes.append(Box(14, DOG, "Dog", 250.0, 10.0, 10.0, 10.0))  # right of the 200-wide image
    outside.boxes.append(Box(15, DOG, "Dog", 230.0, 40.0, 5.0, 5.0))
    broken = _image(tmp_path, 3, name="im3.png")
    (tmp_path / "im3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cands = [_cand(1, 11, 12, "a"), _cand(2, 14, 15, "b", s_cat=DOG, o_cat=DOG), _cand(2, 11, 12, "c"),
             _cand(3, 11, 12, "d")]  # fmt: skip
    out = _run([good, outside, broken], cands, Scripted({}), tmp_path, o365)
    assert sorted((r.image_id, r.box_a_ann_id, r.box_b_ann_id) for r in out.rows) == [
        (1, 11, 12),
        (2, 11, 12),
    ]
    reasons = {q.image_id: q for q in out.quarantine}
    assert reasons[2].reason == "empty_union_box" and reasons[2].record == "im2.png pair (14, 15)"
    assert "no pixel inside the 200x100 image" in reasons[2].detail and json.loads(reasons[2].values)[
        "pair"
    ] == [14, 15]
    assert reasons[3].stage == "region" and reasons[3].reason == "decode_error"
    assert "im3.png" in reasons[3].detail and "(1 union boxes not captioned)" in reasons[3].detail
    assert out.stats["pairs_not_captioned"] == {"empty_union_box": 1, "decode_error": 1}
    # the pairs of the good images keep their caption ids
    assert [r.caption_id for r in out.rows] == [-1, -2]


def test_a_batch_without_candidates_captions_nothing(tmp_path, o365):
    cap = Scripted({})
    out = _run([_image(tmp_path)], [], cap, tmp_path, o365)
    assert out.rows == [] and out.quarantine == [] and cap.calls == []
    assert out.stats["region_captions"] == out.stats["new_candidates"] == out.stats["generate_calls"] == 0


def test_a_pair_naming_a_box_the_image_lacks_is_an_error_naming_it(tmp_path, o365):
    with pytest.raises(
        ValueError, match=r"candidate pair \(11, 99\) of image 1 names a box the image does not have"
    ):
        _run([_image(tmp_path)], [_cand(1, 11, 99, "a")], Scripted({}), tmp_path, o365)


# -- tiny BLIP: beam search -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_blip

    return build_tiny_blip(str(tmp_path_factory.mktemp("tiny_blip_region")))


def _blip_cfg(blip_dir, **region) -> PipelineConfig:
    from tests.tiny_models import SIZE

    return PipelineConfig.model_validate(
        {
            "caption": {"model": blip_dir},
            "region": {"enabled": True, "image_size": SIZE, "max_length": 12, "min_length": 6, **region},
        }  # fmt: skip
    )


def test_region_captions_are_beam_search_deterministic_and_batch_independent(tmp_path, o365, blip_dir):
    ims = [_image(tmp_path, i, name=f"im{i}.png") for i in (1, 2)]
    cands = [
        c for i in (1, 2) for c in (_cand(i, 11, 12, "a"), _cand(i, 11, 13, "b", o_cat=DOG, o_lab="Dog"))
    ]
    cap = region_mod.build_region_captioner(_blip_cfg(blip_dir))
    assert cap.n_cap == 1 and cap.num_beams == 3 and cap.sampling()["mode"] == "beam"
    first = _run(ims, cands, cap, tmp_path, o365, batch_size=4)
    again = _run(ims, cands, cap, tmp_path, o365, batch_size=4)
    alone = _run(ims, cands, cap, tmp_path, o365, batch_size=1)
    assert len({(r.image_id, r.caption_id) for r in first.rows}) == 4 and all(r.text for r in first.rows)
    assert [(r.caption_id, r.text) for r in first.rows] == [(r.caption_id, r.text) for r in again.rows]
    assert [(r.caption_id, r.text) for r in first.rows] == [(r.caption_id, r.text) for r in alone.rows]
    assert first.stats["generate_calls"] == 1 and alone.stats["generate_calls"] == 4
    assert (
        json.loads(first.rows[0].sampling)["mode"] == "beam" and first.rows[0].captioner == f"blip:{blip_dir}"
    )
    # a pair's caption is the caption of its union crop: captioning that crop directly gives the same text
    direct = cap.caption([ims[0]], [Image.open(tmp_path / "im1.png").convert("RGB").crop((10, 5, 70, 60))], 0)
    assert direct == [[first.rows[0].text]]


# -- keys, config, help ---------------------------------------------------------------------------------------


INPUTS = {"annotations_sha256": "a" * 64, "images_root": "/images", "captions_sha256": "c" * 64}


def _keys(cfg: PipelineConfig) -> dict:
    return {link.stage: link.key for link in chain(cfg, INPUTS)[1]}


def test_keys_region_on_changes_region_and_after_only_and_off_settings_change_nothing():
    off = _keys(PipelineConfig())
    assert list(off)[3:6] == ["match", "region", "tag"]
    on = _keys(PipelineConfig.model_validate({"region": {"enabled": True}}))
    assert [s for s in off if off[s] != on[s]] == ["region", "tag", "threshold", "write"]
    # off, the other region settings change nothing; on, each does (and the captioner's identity)
    assert _keys(PipelineConfig.model_validate({"region": {"num_beams": 5, "max_pairs": 3}})) == off
    for change in ({"num_beams": 5}, {"max_pairs": 3}, {"model": "other/blip"}, {"batch_size": 8}):
        other = _keys(PipelineConfig.model_validate({"region": {"enabled": True, **change}}))
        assert [s for s in off if other[s] != on[s]] == ["region", "tag", "threshold", "write"], change
    # the device is in no key; the region model defaults to the caption stage's
    assert _keys(PipelineConfig.model_validate({"region": {"enabled": True, "device": "cuda"}})) == on
    same = _keys(
        PipelineConfig.model_validate(
            {"region": {"enabled": True, "model": "Salesforce/blip-image-captioning-large"}}
        )
    )
    assert same == on
    # a run recorded before the region stage existed: its tag, threshold and write keys are not this chain's
    registry.unregister("region")
    try:
        before = _keys(PipelineConfig())
    finally:
        registry.register(region_mod.STAGE, before="tag")
    assert [s for s in before if before[s] != off[s]] == ["tag", "threshold", "write"]


def test_region_section_validated_and_its_flags_in_the_help(capsys):
    from flows.cli import main

    with pytest.raises(ValueError, match="max_pairs"):
        PipelineConfig.model_validate({"region": {"max_pairs": 0}})
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        PipelineConfig.model_validate({"region": {"beams": 2}})
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--region-captions" in text
        and "region.enabled: caption the union box of every candidate pair" in text
    )
    assert "--region-beams" in text and "--region-max-pairs" in text
    assert "region.batch_size: union crops per generate call (default: 32)" in text
    assert (
        "preset 'blip+blip2' = the paper's best row (Table 21: BLIP + BLIP-2 nucleus, 10 captions each"
        in text
    )


# -- the flow -------------------------------------------------------------------------------------------------


def _labels(folder: str) -> list[dict]:
    rows = []
    for f in sorted(
        glob.glob(os.path.join(folder, "**", "triplets", "*", "shard-*.parquet"), recursive=True)
    ):
        rows += [{k: v for k, v in r.items() if k != "run_key"} for r in pq.read_table(f).to_pylist()]
    return rows


def _params(tmp_path, ds, out: str, **sections):
    from flows.params import LabelParams

    cfg = PipelineConfig.model_validate({"dataset": "t", "plan": {"batch_size": 5}, **sections})
    return LabelParams(
        annotations=ds["detections"], images=ds["images_root"], out=str(tmp_path / out), captions=ds["captions"],
        config=cfg,
    )  # fmt: skip


@pytest.fixture
def dataset(tmp_path):
    from benchmarks.synth import write_dataset

    return write_dataset(str(tmp_path / "ds"), 15, seed=11)


def test_off_by_default_loads_nothing_and_labels_equal_a_run_without_the_stage(
    prefect_harness, tmp_path, dataset, monkeypatch
):
    from flows.label import label_dataset

    def no_model(cfg):
        raise AssertionError("the region stage is off: no model may be loaded")

    monkeypatch.setattr(region_mod, "build_region_captioner", no_model)
    clear_process_resources()
    on = label_dataset(_params(tmp_path, dataset, "default"))
    assert on["stages"]["region"]["region_captions"] == 0 and on["stages"]["region"]["enabled"] is False
    files = glob.glob(
        str(tmp_path / "default" / "**" / "regions" / "*" / "shard-*" / "*.parquet"), recursive=True
    )
    assert len(files) == 3 and all(pq.read_table(f).num_rows == 0 for f in files)
    registry.unregister("region")
    try:
        without = label_dataset(_params(tmp_path, dataset, "without"))
    finally:
        registry.register(region_mod.STAGE, before="tag")
    assert "region" not in without["stages"] and without["run_key"] != on["run_key"]
    assert _labels(str(tmp_path / "default")) == _labels(str(tmp_path / "without")) != []
    funnel = {f["stage"]: f["count"] for f in on["funnel"]}
    assert funnel["region_captions"] == funnel["region_new_candidates"] == 0


def _scripted_for(images_by_id):
    """Per pair, a caption naming the two boxes' classes (reversed: object first), so that region candidates are
    known in advance: "a dog sitting on a person" for a (person, dog) pair."""
    words = {"Person": "man", "Chair": "chair", "Cup": "cup", "Dog": "dog", "Car": "car", "Bench": "bench",
             "Horse": "horse", "Umbrella": "umbrella", "Bottle": "bottle", "Bicycle": "bicycle",
             "Dinning Table": "table"}  # fmt: skip

    class PairCaptioner(Scripted):
        def caption(self, images, pixels, seed):
            self.calls.append(len(images))
            return [
                [f"a {words[im.boxes[1].label]} sitting on a {words[im.boxes[0].label]}"] for im in images
            ]

    return PairCaptioner({})


def test_on_in_the_flow_resumes_mid_stage_and_tags_the_region_candidates(
    prefect_harness, tmp_path, dataset, monkeypatch
):
    import tasks.run.pipeline as pipeline
    from flows.label import label_dataset
    from flows.status import find_runs, run_status

    cap = _scripted_for(None)
    monkeypatch.setattr(region_mod, "build_region_captioner", lambda cfg: cap)
    clear_process_resources()
    params = _params(tmp_path, dataset, "out", region={"enabled": True})
    real = pipeline.compute
    calls = []

    def failing(ctx, name, shard, batch):
        if name == "region":
            calls.append(batch)
            if batch == 1 and calls.count(1) == 1:
                raise RuntimeError("region batch 1 fails once")
        return real(ctx, name, shard, batch)

    monkeypatch.setattr(pipeline, "compute", failing)
    with pytest.raises(Exception, match="region/.*batch-00001"):
        label_dataset(params)
    (run,) = find_runs(params.out)
    st = run_status(run)
    assert st["totals"]["region"] == {"done": 2, "failed": 1, "pending": 0}
    assert st["totals"]["tag"]["done"] == 2  # the failed batch's later stages did not run
    summary = label_dataset(params)
    assert calls == [0, 1, 2, 1] and run_status(run)["complete"]  # only the failed unit redone

    fresh_params = params.model_copy(update={"out": str(tmp_path / "fresh")})
    monkeypatch.setattr(pipeline, "compute", real)
    label_dataset(fresh_params)
    (fresh,) = find_runs(fresh_params.out)
    assert fresh.run_key == run.run_key
    assert open(run.triplets(0), "rb").read() == open(fresh.triplets(0), "rb").read()

    # the region stage's rows: every pair's caption, with the union box and the candidates it gave
    rows = pq.read_table(os.path.join(run.base, "regions", run.key("region"))).to_pylist()
    assert rows and all(r["caption_id"] < 0 and r["text"].startswith("a ") for r in rows)
    regions = summary["stages"]["region"]
    assert regions["region_captions"] == len({(r["image_id"], r["caption_id"]) for r in rows}) > 0
    assert regions["new_candidates"] == sum(bool(r["is_new"]) for r in rows) > 0
    reversed_ = [
        r for r in rows if r["subject_ann_id"] == r["box_b_ann_id"] and r["box_a_ann_id"] != r["box_b_ann_id"]
    ]
    assert reversed_  # "a <b> sitting on a <a>": the candidate is (b, a)
    funnel = {f["stage"]: f for f in summary["funnel"]}
    assert funnel["region_captions"]["count"] == regions["region_captions"]
    assert funnel["region_new_candidates"]["count"] == regions["new_candidates"]
    assert summary["stages"]["tag"]["candidates_from_region"] == regions["new_candidates"]

    # tagged and labelled: greedy tags every candidate; region rows carry negative caption ids, no source ids
    tags = pq.read_table(os.path.join(run.base, "tags", run.key("tag"))).to_pylist()
    new = {
        (r["image_id"], r["subject_ann_id"], r["object_ann_id"], r["relation"]) for r in rows if r["is_new"]
    }
    tagged = {(t["image_id"], t["subject_ann_id"], t["object_ann_id"], t["relation"]): t for t in tags}
    assert new <= set(tagged) and all(
        tagged[k]["caption_ids"] == [r["caption_id"]]
        for r in rows
        if r["is_new"]
        for k in [(r["image_id"], r["subject_ann_id"], r["object_ann_id"], r["relation"])]
    )
    triplets = pq.read_table(run.triplets(0)).to_pylist()
    from_region = [t for t in triplets if any(k < 0 for k in t["caption_ids"])]
    assert from_region and all(
        s is None for t in from_region for k, s in zip(t["caption_ids"], t["caption_source_ids"]) if k < 0
    )


def test_cli_region_captions_with_tiny_blip_on_the_sample(
    prefect_harness, tmp_path, blip_dir, capsys, monkeypatch
):
    """`reltag run --region-captions true`: the real BLIP loaded once from disk (region.model defaults to
    caption.model), one caption per union box of the sample's candidate pairs, recorded with the run."""
    from flows.cli import EXAMPLES, main
    from flows.status import find_runs

    clear_process_resources()
    loads = []
    real = region_mod.build_region_captioner
    monkeypatch.setattr(region_mod, "build_region_captioner", lambda cfg: (loads.append(1), real(cfg))[1])
    rc = main(["run", "--annotations", str(EXAMPLES / "sample_detections.json"), "--images", str(EXAMPLES / "images"),
               "--captions", str(EXAMPLES / "sample_captions.json"), "--out", str(tmp_path / "out"), "--dataset",
               "sample", "--caption-model", blip_dir, "--region-captions", "true", "--region-batch-size", "4",
               "--batch-size", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (run,) = find_runs(str(tmp_path / "out"))
    assert loads == [1]  # one load for the 3 batches of the process
    record = json.loads(open(run.manifest).read())
    assert record["revisions"]["region_captioner"].startswith("blip:local:")
    link = {c["stage"]: c for c in record["chain"]}["region"]
    assert link["settings"]["enabled"] is True and link["settings"]["num_beams"] == 3
    cands = pq.read_table(os.path.join(run.base, "candidates", run.key("match"))).to_pylist()
    rows = pq.read_table(os.path.join(run.base, "regions", run.key("region"))).to_pylist()
    pairs = {(c["image_id"], frozenset((c["subject_ann_id"], c["object_ann_id"]))) for c in cands}
    assert {(r["image_id"], frozenset((r["box_a_ann_id"], r["box_b_ann_id"]))) for r in rows} == pairs
    assert all(
        r["captioner"] == f"blip:{blip_dir}" and json.loads(r["sampling"])["mode"] == "beam" for r in rows
    )
    assert all(r["union_box"][2] > 0 and r["union_box"][3] > 0 and r["caption_id"] < 0 for r in rows)
    stats = json.loads(open(run.run_stats).read())["stages"]["region"]
    assert stats["region_captions"] == len({(r["image_id"], r["caption_id"]) for r in rows}) == len(pairs)
