"""Planning: validation of detection records, sharding, quarantine, run keys."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from storage import schemas
from storage.layout import RunLayout, shard_records
from storage.records import Quarantined
from tasks.config import PipelineConfig, PlanConfig
from tasks.images import unsafe_name
from tasks.stages.plan import plan_shards, read_categories
from tasks.stages.plan.start import plan_run

CATS = [{"id": 1, "name": "Person"}, {"id": 2, "name": "Chair"}]


def _write(tmp_path, images, annotations, categories=CATS, name="det.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(p)


def _img(i, w=100, h=80, f=None):
    return {"id": i, "file_name": f or f"{i:06d}.jpg", "width": w, "height": h}


def _ann(a, i, c=1, bbox=(10, 10, 20, 20), crowd=0):
    return {"id": a, "image_id": i, "category_id": c, "bbox": list(bbox), "iscrowd": crowd}


def _plan(tmp_path, path, **cfg):
    layout = RunLayout(str(tmp_path / "out"), "ds", "key")
    out = plan_shards(path, layout, PlanConfig(**cfg))
    return layout, out


def _quarantine(layout) -> list[Quarantined]:
    return schemas.from_table(pq.read_table(layout.quarantine("plan")), Quarantined)


def test_shards_are_cut_in_file_order_and_boxes_attached(tmp_path):
    images = [_img(i) for i in range(1, 8)]
    anns = [_ann(100 + i, i, c=1 + i % 2) for i in range(1, 8)] + [_ann(200, 3, bbox=(0, 0, 5, 5))]
    layout, out = _plan(tmp_path, _write(tmp_path, images, anns), shard_size=3, batch_size=2)
    assert [s["images"] for s in out.shards] == [3, 3, 1]
    assert [s["batches"] for s in out.shards] == [2, 2, 1]
    recs = shard_records(layout, 1)
    assert [r.image_id for r in recs] == [4, 5, 6]
    recs0 = shard_records(layout, 0)
    assert [b.ann_id for b in recs0[2].boxes] == [103, 200]
    assert recs0[0].boxes[0].label == "Chair"
    assert layout.images(2).endswith("images/shard-00002.parquet")


def test_crowd_ignore_and_zero_area_boxes_are_dropped_and_counted_negative_ones_quarantined(tmp_path):
    anns = [_ann(1, 1, crowd=1), _ann(2, 1, bbox=(5, 5, 0, 10)), _ann(3, 1, bbox=(5, 5, 10, -1)), _ann(4, 1),
            {**_ann(5, 1), "ignore": 1}, {**_ann(6, 1), "ignore": 0}]  # fmt: skip
    layout, out = _plan(tmp_path, _write(tmp_path, [_img(1)], anns))
    assert out.counts["dropped_crowd"] == 1 and out.counts["dropped_ignore"] == 1
    assert out.counts["dropped_zero_area"] == 1 and out.counts["quarantined_bad_bbox"] == 1
    assert [b.ann_id for b in shard_records(layout, 0)[0].boxes] == [4, 6]
    (q,) = _quarantine(layout)
    assert (q.reason, q.record, q.image_id) == ("bad_bbox", "annotation 3", 1)
    assert "must not be negative" in q.detail and json.loads(q.values)["bbox"] == [5.0, 5.0, 10.0, -1.0]


def test_file_order_and_class_order_recorded_for_reference_mode(tmp_path):
    # file order differs from id order; crowd, zero-area and empty-after-clipping annotations are dropped from
    # the boxes (unchanged, id order) but their classes enter class_order, by first annotation in the file
    cats = CATS + [{"id": 3, "name": "Dog"}, {"id": 4, "name": "Cup"}]
    anns = [
        _ann(30, 1, c=3, crowd=1),
        _ann(9, 2, c=2),
        _ann(20, 1, c=2),
        _ann(5, 1, c=4, bbox=(5, 5, 0, 10)),
        _ann(10, 1, c=2),
        _ann(7, 1, c=1, bbox=(200, 10, 5, 5)),  # entirely outside: quarantined, its class still counts
        _ann(11, 2, c=1, crowd=1),
    ]
    layout, out = _plan(tmp_path, _write(tmp_path, [_img(1), _img(2)], anns, categories=cats))
    r1, r2 = shard_records(layout, 0)
    assert [b.ann_id for b in r1.boxes] == [10, 20] and r1.box_file_index == [4, 2]
    assert r1.class_order == [3, 2, 4, 1]
    assert [b.ann_id for b in r2.boxes] == [9] and r2.box_file_index == [1] and r2.class_order == [2, 1]
    assert out.counts["dropped_crowd"] == 2 and out.counts["dropped_zero_area"] == 1


def test_images_planned_before_the_file_order_read_as_none(tmp_path):
    layout, _ = _plan(tmp_path, _write(tmp_path, [_img(1)], [_ann(4, 1)]))
    with layout.fs.open(layout.images(0), "rb") as f:
        t = pq.read_table(f)
    old = t.drop_columns(["box_file_index", "class_order"])  # the layout before these columns
    with layout.fs.open(layout.images(0), "wb") as f:
        pq.write_table(old, f)
    (r,) = shard_records(layout, 0)
    assert [b.ann_id for b in r.boxes] == [4] and r.box_file_index is None and r.class_order is None


def test_box_outside_image_is_clipped_by_default(tmp_path):
    anns = [_ann(1, 1, bbox=(-5, 70, 20, 20))]
    layout, out = _plan(tmp_path, _write(tmp_path, [_img(1, w=100, h=80)], anns))
    b = shard_records(layout, 0)[0].boxes[0]
    assert (b.x, b.y, b.w, b.h) == (0.0, 70.0, 15.0, 10.0)
    assert out.counts["clipped_boxes"] == 1


def test_box_outside_image_is_quarantined_when_asked(tmp_path):
    anns = [_ann(7, 1, bbox=(90, 10, 20, 20))]
    layout, out = _plan(tmp_path, _write(tmp_path, [_img(1)], anns), box_policy="quarantine")
    assert shard_records(layout, 0)[0].boxes == []
    (q,) = _quarantine(layout)
    assert q.reason == "bbox_outside_image" and q.record == "annotation 7"
    assert "[90.0, 10.0, 20.0, 20.0] leaves image 1 of size 100x80" in q.detail


def test_box_entirely_outside_is_quarantined_even_when_clipping(tmp_path):
    layout, _ = _plan(tmp_path, _write(tmp_path, [_img(1)], [_ann(7, 1, bbox=(200, 10, 20, 20))]))
    assert [q.reason for q in _quarantine(layout)] == ["bbox_outside_image"]


@pytest.mark.parametrize(
    "image, reason, detail",
    [
        (
            {"id": 5, "file_name": "a.jpg", "width": 10},
            "missing_size",
            "image 5 has width 10 and height None",
        ),
        ({"id": 5, "file_name": "/etc/passwd", "width": 10, "height": 10}, "unsafe_file_name", "is absolute"),
        (
            {"id": 5, "file_name": "../x.jpg", "width": 10, "height": 10},
            "unsafe_file_name",
            "contains '..'",
        ),
        ({"id": 5, "file_name": "a/../../x.jpg", "width": 10, "height": 10}, "unsafe_file_name", "'..'"),
        (
            {"id": "5", "file_name": "a.jpg", "width": 10, "height": 10},
            "malformed_image",
            "has id '5', not an integer",
        ),
        ([1, 2], "malformed_image", "is list, not an object"),
    ],
)
def test_bad_images_are_quarantined_with_reason(tmp_path, image, reason, detail):
    layout, out = _plan(tmp_path, _write(tmp_path, [image, _img(9)], [_ann(1, 9)]))
    (q,) = _quarantine(layout)
    assert q.reason == reason and detail in q.detail
    assert [r.image_id for r in shard_records(layout, 0)] == [9]
    assert out.counts[f"quarantined_{reason}"] == 1


def test_duplicate_image_id_keeps_first_and_quarantines_the_rest(tmp_path):
    images = [_img(1, f="first.jpg"), _img(2), _img(1, f="second.jpg")]
    layout, _ = _plan(tmp_path, _write(tmp_path, images, [_ann(10, 1)]))
    recs = shard_records(layout, 0)
    assert [(r.image_id, r.file_name) for r in recs] == [(1, "first.jpg"), (2, "000002.jpg")]
    assert [b.ann_id for b in recs[0].boxes] == [10]
    (q,) = _quarantine(layout)
    assert q.reason == "duplicate_image_id" and "'second.jpg'" in q.detail


@pytest.mark.parametrize(
    "ann, reason, detail",
    [
        (_ann(3, 1, c=99), "unknown_category", "has category_id 99, not in 'categories'"),
        (_ann(3, 42), "unknown_image_id", "refers to image 42"),
        (
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},
            "bad_bbox",
            "bbox of annotation 3 is [1, 2, 3]",
        ),
        (
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, "a", 4]},
            "bad_bbox",
            "4 finite numbers",
        ),
        ({"id": 3, "image_id": 1, "bbox": [1, 2, 3, 4]}, "malformed_annotation", "has category_id None"),
    ],
)
def test_bad_annotations_are_quarantined_with_reason(tmp_path, ann, reason, detail):
    layout, _ = _plan(tmp_path, _write(tmp_path, [_img(1)], [ann, _ann(4, 1)]))
    (q,) = _quarantine(layout)
    assert q.reason == reason and detail in q.detail
    assert [b.ann_id for b in shard_records(layout, 0)[0].boxes] == [4]


def test_invalid_json_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"categories": [{"id": 1, "name": "a"}], "images": [{"id": 1,')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON"):
        _plan(tmp_path, str(p))


def test_categories_are_validated(tmp_path):
    with pytest.raises(ValueError, match="category id 1 appears twice"):
        read_categories(_write(tmp_path, [], [], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]))
    with pytest.raises(ValueError, match="has no 'categories'"):
        read_categories(_write(tmp_path, [], [], categories=[]))
    with pytest.raises(ValueError, match="needs an integer 'id'"):
        read_categories(_write(tmp_path, [], [], categories=[{"id": "x", "name": "a"}]))


def test_unsafe_name():
    assert unsafe_name("train/patch0/objects365_v1_00000001.jpg") is None
    assert "absolute" in unsafe_name("C:\\x.jpg")
    assert "URL" in unsafe_name("s3://bucket/x.jpg")
    assert "NUL" in unsafe_name("a\x00.jpg")
    assert "non-empty" in unsafe_name("")


def test_run_key_changes_with_config_and_input_and_planning_is_idempotent(tmp_path):
    from tests.bad_images import noise_jpeg

    det = _write(tmp_path, [_img(1)], [_ann(1, 1)])
    (tmp_path / "000001.jpg").write_bytes(noise_jpeg(100, 80))
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a man on a chair"}]}))
    out = str(tmp_path / "out")
    cfg = PipelineConfig()
    ctx1, m1 = plan_run(det, str(tmp_path), out, str(caps), "ds", cfg)
    ctx2, m2 = plan_run(det, str(tmp_path), out, str(caps), "ds", cfg)
    assert ctx1.run_key == ctx2.run_key and m1 == m2 and ctx1.stage_keys == ctx2.stage_keys
    ctx3, _ = plan_run(
        det,
        str(tmp_path),
        out,
        str(caps),
        "ds",
        cfg.model_copy(update={"threshold": cfg.threshold.model_copy(update={"eta": 0.5})}),
    )
    assert ctx3.run_key != ctx1.run_key and ctx3.plan_key == ctx1.plan_key
    # eta changes the threshold stage's key and the run's; the stages before it keep theirs
    k1, k3 = dict(ctx1.stage_keys), dict(ctx3.stage_keys)
    assert [s for s in k1 if k1[s] != k3[s]] == ["threshold", "write"]
    det2 = _write(tmp_path, [_img(1)], [_ann(2, 1)], name="det2.json")
    ctx4, _ = plan_run(det2, str(tmp_path), out, str(caps), "ds", cfg)
    assert ctx4.run_key != ctx1.run_key and ctx4.plan_key != ctx1.plan_key
    # devices do not change the output, so they do not change any key
    ctx5, _ = plan_run(
        det,
        str(tmp_path),
        out,
        str(caps),
        "ds",
        cfg.model_copy(update={"tag": cfg.tag.model_copy(update={"device": "cuda:1"})}),
    )
    assert ctx5.stage_keys == ctx1.stage_keys
    assert m1.versions["torch"] and m1.categories == CATS
    with pytest.raises(ValueError, match="needs a captions file"):
        plan_run(det, str(tmp_path), out, None, "ds", cfg)
    with pytest.raises(ValueError, match="dataset name '../x'"):
        plan_run(det, str(tmp_path), out, str(caps), "../x", cfg)


def test_input_checksums_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import os

    import tasks.stages.plan.start as pr

    det = _write(tmp_path, [_img(1)], [_ann(1, 1)])
    calls = []
    real = pr.file_checksum
    monkeypatch.setattr(pr, "file_checksum", lambda p: (calls.append(p), real(p))[1])
    out = str(tmp_path / "out")
    first = pr.cached_checksum(det, out)
    assert pr.cached_checksum(det, out) == first and len(calls) == 1
    _write(tmp_path, [_img(2)], [_ann(1, 2)])  # same path, new content
    os.utime(det, (1, 1))
    assert pr.cached_checksum(det, out) != first and len(calls) == 2


# -- images checked at planning (header only, in threads) ----------------------------------------------------


def _case_plan(tmp_path, names, **cfg):
    from tests.bad_images import CASES, write_cases

    root = str(tmp_path / "images")
    write_cases(root)
    images = [_img(i, *CASES[n][:2], f=n) for i, n in enumerate(names, start=1)]
    anns = [_ann(10 + i, i, bbox=(2, 2, 20, 20)) for i in range(1, len(names) + 1)]
    layout = RunLayout(str(tmp_path / "out"), "ds", "key")
    out = plan_shards(_write(tmp_path, images, anns), layout, PlanConfig(**cfg), images_root=root)
    return layout, out


def test_plan_quarantines_images_that_fail_the_header_check_with_their_values(tmp_path):
    from tests.bad_images import CASES

    names = list(CASES)
    layout, out = _case_plan(tmp_path, names, image_threads=4, shard_size=5)
    got = {q.record: (q.reason, q.image_id) for q in _quarantine(layout)}
    want = {n: (c[2], names.index(n) + 1) for n, c in CASES.items() if c[3] == "plan"}
    assert got == want
    planned = [r.file_name for s in range(len(out.shards)) for r in shard_records(layout, s)]
    # cut_third.jpg has an intact header: planning keeps it, the verify stage decodes and quarantines it
    assert planned == [n for n, c in CASES.items() if c[3] != "plan"]
    assert out.counts["images_header_checked"] == len(CASES) and out.counts["images_planned"] == 7
    for reason in ("missing_file", "unsafe_path", "decode_error", "too_large", "size_mismatch"):
        assert out.counts[f"quarantined_{reason}"] == 1
    assert out.counts["boxes_of_quarantined_images"] == 5
    q = {q.record: q for q in _quarantine(layout)}
    assert "stored size 60x40 != annotated 120x80" in q["small.jpg"].detail
    assert json.loads(q["huge.png"].values) == {
        "id": 11,
        "file_name": "huge.png",
        "width": 40000,
        "height": 40000,
    }
    assert "outside the image root" in q["link_out.jpg"].detail


def test_pixel_limit_is_a_plan_setting(tmp_path):
    layout, out = _case_plan(tmp_path, ["good_a.jpg", "good_b.jpg"], max_pixels=64 * 48 - 1)
    assert [q.reason for q in _quarantine(layout)] == ["too_large", "too_large"]
    assert "64x48 = 3072 pixels > limit 3071" in _quarantine(layout)[0].detail


def test_size_mismatch_can_rescale_the_boxes_instead(tmp_path):
    from tests.bad_images import write_cases

    root = str(tmp_path / "images")
    write_cases(root)
    # annotated on a 120x80 grid; the file holds 60x40 pixels: boxes halve, the box leaving the image is clipped
    images = [_img(1, 120, 80, f="small.jpg")]
    anns = [_ann(1, 1, bbox=(20, 20, 60, 40)), _ann(2, 1, bbox=(100, 70, 40, 20))]
    layout = RunLayout(str(tmp_path / "out"), "ds", "key")
    out = plan_shards(
        _write(tmp_path, images, anns), layout, PlanConfig(size_mismatch="rescale"), images_root=root
    )
    (r,) = shard_records(layout, 0)
    assert (r.width, r.height) == (60, 40)
    assert [(b.x, b.y, b.w, b.h) for b in r.boxes] == [(10.0, 10.0, 30.0, 20.0), (50.0, 35.0, 10.0, 5.0)]
    assert out.counts["rescaled_images"] == 1 and out.counts["clipped_boxes"] == 1 and out.n_quarantined == 0


def test_a_plan_is_keyed_by_its_image_root_and_a_root_without_the_images_is_refused(tmp_path):
    from tasks.stages.plan.start import run_context

    det = _write(tmp_path, [_img(1)], [_ann(1, 1)])
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a man on a chair"}]}))
    out = str(tmp_path / "out")
    wrong = str(tmp_path / "typo")
    with pytest.raises(
        ValueError, match=r"none of the 1 images of .* can be used with --images .*typo \(1 missing_file;"
    ):
        plan_run(det, wrong, out, str(caps), "ds", PipelineConfig())
    with pytest.raises(ValueError, match="is it the right image folder"):  # a rerun says the same
        plan_run(det, wrong, out, str(caps), "ds", PipelineConfig())
    (tmp_path / "img").mkdir()
    from tests.bad_images import noise_jpeg

    (tmp_path / "img" / "000001.jpg").write_bytes(noise_jpeg(100, 80))
    right, plan = plan_run(det, str(tmp_path / "img"), out, str(caps), "ds", PipelineConfig())
    assert plan.counts["images_planned"] == 1
    # the wrong folder's plan (everything missing) is never reused for the right one
    assert run_context(det, wrong, out, str(caps), "ds", PipelineConfig()).ctx.plan_key != right.plan_key


def test_image_threads_default_to_one_on_local_disk_and_a_pool_on_object_stores():
    """bench_plan measured a 16-thread pool at 0.3x one thread for header checks of local files (Python-bound),
    so local roots check headers in one thread; object stores (latency-bound) in 16; decoding one per core."""
    import os

    from tasks.config import PlanConfig

    cfg = PlanConfig()
    assert cfg.header_threads("/data/o365") == 1 and cfg.header_threads("file:///data/o365") == 1
    assert cfg.header_threads("s3://bucket/o365") == 16
    assert cfg.decode_threads() == (os.cpu_count() or 1)
    fixed = PlanConfig(image_threads=4)
    assert (
        fixed.header_threads("/data") == 4
        and fixed.header_threads("s3://b/x") == 4
        and fixed.decode_threads() == 4
    )
