"""Malformed detection records are quarantined with their values and a counted reason; files that are not
detection JSON, and captions for other images, are refused in one line (exit 2) before any flow starts."""

from __future__ import annotations

import io
import json
import math

import ijson
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import schemas
from storage.layout import RunLayout, shard_records
from storage.records import Quarantined
from tasks.config import PlanConfig
from tasks.stages.plan import plan_shards
from tasks.stages.plan.detections import _NonFinite

CATS = [{"id": 1, "name": "Person"}, {"id": 2, "name": "Chair"}]


def _img(i, w=100, h=80):
    return {"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h}


def _ann(a, i, c=1, bbox=(10, 10, 20, 20), **extra):
    return {"id": a, "image_id": i, "category_id": c, "bbox": list(bbox), "iscrowd": 0, **extra}


def _plan(tmp_path, images, anns, text=None, **cfg):
    p = tmp_path / "det.json"
    # json.dumps writes NaN / Infinity / -Infinity for non-finite floats, as files made by Python do
    p.write_text(text or json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    layout = RunLayout(str(tmp_path / "out"), "ds", "key")
    out = plan_shards(str(p), layout, PlanConfig(**cfg))
    rows = schemas.from_table(pq.read_table(layout.quarantine("plan")), Quarantined)
    return layout, out, rows


@pytest.mark.parametrize(
    "bbox, detail",
    [
        ([10, 10, -5, 20], "width and height must not be negative"),
        ([10, 10, 5, -0.5], "width and height must not be negative"),
        ([10, math.nan, 5, 5], "'NaN'"),
        ([10, 10, math.inf, 5], "'Infinity'"),
        ([-math.inf, 10, 5, 5], "'-Infinity'"),
        ([10, "10", 5, 5], "expected 4 finite numbers"),
        ([10, 10, True, 5], "expected 4 finite numbers"),
        ([10, 10, 5], "expected 4 finite numbers"),
        ({"x": 1}, "expected 4 finite numbers"),
    ],
)
def test_bad_bbox_is_quarantined_with_its_values_and_counted(tmp_path, bbox, detail):
    layout, out, rows = _plan(tmp_path, [_img(1)], [_ann(3, 1, bbox=bbox), _ann(4, 1)])
    (q,) = rows
    assert (q.reason, q.record, q.image_id, q.stage) == ("bad_bbox", "annotation 3", 1, "plan")
    assert detail in q.detail
    assert json.loads(q.values)["id"] == 3 and "bbox" in json.loads(q.values)
    assert out.counts["quarantined_bad_bbox"] == 1
    assert [b.ann_id for b in shard_records(layout, 0)[0].boxes] == [4]


def test_non_finite_values_elsewhere_quarantine_their_record_not_the_file(tmp_path):
    images = [{"id": 1, "file_name": "NaN.jpg", "width": math.nan, "height": 80}, _img(2)]
    layout, out, rows = _plan(tmp_path, images, [_ann(3, 2, c=1), _ann(4, 2, c=2)])
    (q,) = rows
    assert q.reason == "missing_size" and q.image_id == 1 and "width 'NaN'" in q.detail
    assert json.loads(q.values)["file_name"] == "NaN.jpg"  # a string holding NaN is left alone
    assert [r.image_id for r in shard_records(layout, 0)] == [2]


def test_duplicate_annotation_ids_keep_the_first_use_across_shards(tmp_path):
    images = [_img(1), _img(2), _img(3)]
    anns = [_ann(7, 1), _ann(8, 2), _ann(7, 3, c=2), _ann(9, 3), _ann(7, 1, bbox=(1, 1, 5, 5))]
    layout, out, rows = _plan(tmp_path, images, anns, shard_size=1)
    assert [(q.reason, q.image_id) for q in rows] == [
        ("duplicate_annotation_id", 1),
        ("duplicate_annotation_id", 3),
    ]
    assert {q.detail for q in rows} == {
        "annotation id 7 at annotations[4] (image 1) was used before at annotations[0]; the first use is kept",
        "annotation id 7 at annotations[2] (image 3) was used before at annotations[0]; the first use is kept",
    }
    assert json.loads(rows[0].values)["bbox"] == [1.0, 1.0, 5.0, 5.0]
    boxes = {s: [b.ann_id for b in shard_records(layout, s)[0].boxes] for s in range(3)}
    assert boxes == {0: [7], 1: [8], 2: [9]}
    assert out.counts["quarantined_duplicate_annotation_id"] == 2


def test_unknown_category_and_ignore_boxes(tmp_path):
    anns = [_ann(3, 1, c=99), _ann(4, 1, ignore=1), _ann(5, 1, ignore=1, iscrowd=1), _ann(6, 1, ignore=0)]
    layout, out, rows = _plan(tmp_path, [_img(1)], anns)
    (q,) = rows
    assert (
        q.reason == "unknown_category"
        and "category_id 99" in q.detail
        and json.loads(q.values)["category_id"] == 99
    )
    assert out.counts["dropped_ignore"] == 1 and out.counts["dropped_crowd"] == 1  # counted once each
    assert [b.ann_id for b in shard_records(layout, 0)[0].boxes] == [6]


# -- the reader that lets NaN / Infinity through as strings ----------------------------------------------------

_text = st.text(alphabet=st.sampled_from(list('aN"\\/{}[],: Infinity\n\u00e9')), max_size=12)
_leaf = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), _text, st.booleans(), st.none()
)
_doc = st.recursive(
    _leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(_text, c, max_size=4)), max_leaves=20
)


@settings(max_examples=400, deadline=None)
@given(doc=st.dictionaries(_text, _doc, max_size=4), block=st.integers(1, 40))
def test_non_finite_reader_equals_json_loads_with_the_tokens_as_strings(doc, block):
    blob = json.dumps(doc).encode()
    want = json.loads(blob, parse_constant=lambda s: s)  # NaN -> "NaN", -Infinity -> "-Infinity"
    got = next(ijson.items(_NonFinite(_Trickle(blob, block)), "", use_float=True))
    assert got == want


class _Trickle(io.BytesIO):
    """A file that returns at most `step` bytes per read, so tokens and escapes fall across reads."""

    def __init__(self, blob: bytes, step: int):
        super().__init__(blob)
        self.step = step

    def read(self, n=-1):
        return super().read(self.step if n is None or n < 0 else min(n, self.step))


# -- files that are not detection JSON: one line, exit 2, before any flow starts --------------------------------


def _cli(tmp_path, monkeypatch, det_text, caps=None):
    import flows.label
    from flows.cli import main

    def no_flow(*a, **k):
        raise AssertionError("a flow was started")

    monkeypatch.setattr(flows.label, "run_in_process", no_flow)
    det = tmp_path / "det.json"
    det.write_text(det_text)
    cap = tmp_path / "caps.json"
    cap.write_text(json.dumps(caps or {"annotations": [{"image_id": 1, "caption": "a man"}]}))
    return main(
        [
            "run",
            "--annotations",
            str(det),
            "--images",
            str(tmp_path),
            "--captions",
            str(cap),
            "--out",
            str(tmp_path / "out"),
            "--vocabulary",
            "o365",
            "--dataset",
            "m",
        ]
    )  # fmt: skip (no inference)


GOOD = {"images": [_img(1)], "annotations": [_ann(1, 1)], "categories": CATS}


@pytest.mark.parametrize(
    "text, message",
    [
        (json.dumps(GOOD)[:60], "is not valid JSON (while reading 'categories', near byte "),
        (json.dumps([GOOD]), "is a JSON list, not an object with 'images', 'annotations' and 'categories'"),
        ("", "is empty"),
        ("hello", "is not JSON (starts with b'hello')"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "categories"}), "has no 'categories' key"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "images"}), "has no images ('images' is missing"),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "annotations"}),
            "has no annotations ('annotations' is",
        ),
        (json.dumps({**GOOD, "categories": {"1": "Person"}}), "'categories' is a dict, not a list"),
    ],
)
def test_not_a_detection_file_is_one_line_exit_2_before_any_flow(
    tmp_path, monkeypatch, capsys, text, message
):
    assert _cli(tmp_path, monkeypatch, text) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reltag run: error: annotations file ")
    assert str(tmp_path / "det.json") in err[0] and message in err[0], err[0]


def test_captions_of_other_images_are_refused_before_any_flow(tmp_path, monkeypatch, capsys):
    (tmp_path / "000001.jpg").write_bytes(_jpeg(100, 80))
    other = {"annotations": [{"image_id": 5, "caption": "a man"}, {"image_id": 6, "caption": "a dog"}]}
    assert _cli(tmp_path, monkeypatch, json.dumps(GOOD), other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"reltag run: error: captions file {tmp_path / 'caps.json'}: none of its 2 image ids matches any of the 1 "
        f"planned images of {tmp_path / 'det.json'} (captions of another dataset or split?)"
    ]


def test_captions_covering_few_images_warn_with_the_count(tmp_path, caplog):
    from tasks.config import PipelineConfig
    from tasks.stages.plan.start import plan_run

    images = [_img(i) for i in range(1, 5)]
    for i in range(1, 5):
        (tmp_path / f"{i:06d}.jpg").write_bytes(_jpeg(100, 80))
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"images": images, "annotations": [_ann(1, 1)], "categories": CATS}))
    cap = tmp_path / "caps.json"
    cap.write_text(
        json.dumps({"annotations": [{"image_id": 2, "caption": "a man"}, {"image_id": 9, "caption": "x"}]})
    )
    with caplog.at_level("WARNING", logger="reltag.inputs"):
        plan_run(str(det), str(tmp_path), str(tmp_path / "out"), str(cap), "ds", PipelineConfig())
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: captions file {cap} covers only 1 of 4 planned images (25.0%); the others get no captions"
    ]


def _jpeg(w, h) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 9, 9)).save(buf, format="JPEG")
    return buf.getvalue()


def test_an_image_folder_without_the_images_is_one_line_exit_2_before_any_flow(tmp_path, monkeypatch, capsys):
    assert _cli(tmp_path, monkeypatch, json.dumps(GOOD)) == 2  # 000001.jpg is not in --images
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reltag run: error: none of the 1 images of ")
    assert (
        f"can be used with --images {tmp_path} (1 missing_file;" in err[0] and "right image folder" in err[0]
    )


@pytest.mark.flow
def test_malformed_records_no_longer_fail_the_run(prefect_harness, tmp_path, capsys):
    """The issue's cases through the real flow: a negative width, a NaN coordinate, an id used twice in one image
    (which made the match stage fail) and an `ignore` box; the run exits 0 and counts each reason."""
    from benchmarks.synth import write_dataset
    from flows.cli import main
    from flows.status import find_runs

    ds = write_dataset(str(tmp_path / "ds"), 3, seed=2)
    doc = json.loads(open(ds["detections"]).read())
    first = doc["annotations"][0]
    doc["annotations"] += [
        {**first, "id": 1001, "bbox": [10, 10, -5, 20]},
        {**first, "id": 1002, "bbox": [10, math.nan, 5, 20]},
        {**first, "id": first["id"], "bbox": [1, 1, 30, 30]},  # the same id again, same image
        {**first, "id": 1003, "ignore": 1},
    ]
    with open(ds["detections"], "w") as f:
        json.dump(doc, f)  # writes NaN, as Python does
    out = str(tmp_path / "out")
    rc = main(["run", "--annotations", ds["detections"], "--images", ds["images_root"], "--captions",
               ds["captions"], "--out", out, "--dataset", "m"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (run,) = find_runs(out)
    stats = json.loads(open(run.run_stats).read())
    assert stats["triplets"] > 0 and stats["images"] == 3
    plan = stats["plan"]
    assert plan["quarantined_bad_bbox"] == 2 and plan["quarantined_duplicate_annotation_id"] == 1
    assert plan["dropped_ignore"] == 1 and plan["boxes_planned"] == len(doc["annotations"]) - 4
