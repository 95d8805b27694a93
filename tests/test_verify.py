"""The verify stage: every planned image decoded in full before any other stage; the broken ones quarantined
with the decoder's message; odd modes and EXIF-rotated images kept. End to end on the default path (human
captions, greedy tagger), where no model stage opens an image."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from storage import schemas
from storage.records import ImageRecord, Quarantined
from tasks.config import PipelineConfig, PlanConfig
from tasks.run.registry import chain, stage, stages
from tasks.stages.verify import verify_batch
from tests.bad_images import CASES, exif_rotated_jpeg, noise_jpeg, write_cases


def _recs(names, dims=None) -> list[ImageRecord]:
    dims = dims or {n: CASES[n][:2] for n in names}
    return [ImageRecord(i + 1, n, *dims[n], 0) for i, n in enumerate(names)]


def test_truncated_jpeg_passes_a_header_check_and_fails_full_decoding(tmp_path):
    from tasks.images import check_header

    blob = noise_jpeg(64, 48, seed=7)
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 3])
    assert check_header(str(tmp_path), "cut.jpg").width == 64  # the header is intact
    verified, quarantined, stats = verify_batch(
        _recs(["cut.jpg"], {"cut.jpg": (64, 48)}), str(tmp_path), 10**8
    )
    assert verified == []
    (q,) = quarantined
    assert (q.stage, q.image_id, q.record, q.reason) == ("verify", 1, "cut.jpg", "decode_error")
    assert (
        "image file is truncated" in q.detail and f"({len(blob) // 3} bytes)" in q.detail
    )  # the decoder's words
    assert json.loads(q.values) == {"id": 1, "file_name": "cut.jpg", "width": 64, "height": 48}
    assert stats["images"] == 1 and stats["verified"] == 0  # its reason is counted by run_batch_stage


def test_odd_modes_and_exif_rotation_are_kept_and_reported(tmp_path):
    root = str(tmp_path / "root")
    write_cases(root)
    names = ["good_a.jpg", "cmyk.jpg", "palette.png", "grey16.png", "exif6.jpg"]
    verified, quarantined, stats = verify_batch(_recs(names), root, 10**8, threads=4)
    assert quarantined == []
    assert [(v.file_name, v.mode, v.format, v.exif_orientation) for v in verified] == [
        ("good_a.jpg", "RGB", "JPEG", 1),
        ("cmyk.jpg", "CMYK", "JPEG", 1),
        ("palette.png", "P", "PNG", 1),
        ("grey16.png", "I;16", "PNG", 1),
        ("exif6.jpg", "RGB", "JPEG", 6),
    ]
    # the stored grid, not the displayed one: a 64x48 file with orientation 6 stays 64x48 (its boxes fit it)
    assert all((v.width, v.height) == (64, 48) for v in verified)
    assert stats["converted_to_rgb"] == 3 and stats["exif_rotated"] == 1
    assert stats["top_modes"] == {"RGB": 2, "CMYK": 1, "P": 1, "I;16": 1}
    import hashlib

    assert (
        verified[0].sha256 == hashlib.sha256(open(os.path.join(root, "good_a.jpg"), "rb").read()).hexdigest()
    )


def test_exif_rotated_image_keeps_its_stored_grid_in_the_pixels_every_stage_reads(tmp_path):
    """A portrait-displayed file (orientation 6) stored 64x48: load_image gives 64x48 pixels, so a box annotated
    on the stored grid still covers the same pixels."""
    from tasks.images import load_image

    (tmp_path / "r.jpg").write_bytes(exif_rotated_jpeg(64, 48, orientation=6))
    img, q = load_image(str(tmp_path), ImageRecord(1, "r.jpg", 64, 48, 0))
    assert q is None and img.size == (64, 48)


def test_threads_give_the_rows_of_a_sequential_pass_in_batch_order(tmp_path):
    root = str(tmp_path / "root")
    write_cases(root)
    names = [n for n in CASES if n != "huge.png"]
    recs = _recs(names)
    a = verify_batch(recs, root, 10**8, threads=1)
    b = verify_batch(recs, root, 10**8, threads=6)
    assert a == b
    assert [q.record for q in a[1]] == [
        "missing.jpg",
        "link_out.jpg",
        "cut_third.jpg",
        "cut_40.jpg",
        "small.jpg",
    ]
    assert [q.reason for q in a[1]] == [
        "missing_file",
        "unsafe_path",
        "decode_error",
        "decode_error",
        "size_mismatch",
    ]


def test_verify_heads_the_chain_and_its_key_depends_on_the_plan_and_its_own_settings():
    assert stages()[0].name == "verify" and stage("verify").input is None
    assert stage("caption").input == "verify"

    def keys(cfg, images_root="/data/img"):
        return {
            link.stage: link.key
            for link in chain(cfg, {"annotations_sha256": "x", "images_root": images_root})[1]
        }

    base = PipelineConfig()
    k = keys(base)
    other_caption = base.model_copy(update={"caption": base.caption.model_copy(update={"captioner": "blip"})})
    assert keys(other_caption)["verify"] == k["verify"] and keys(other_caption)["caption"] != k["caption"]
    threads = base.model_copy(update={"plan": PlanConfig(image_threads=3)})
    assert keys(threads) == k  # threads do not change any output
    limit = base.model_copy(update={"plan": PlanConfig(max_pixels=1000)})
    assert keys(limit)["verify"] != k["verify"]
    assert keys(base, "/elsewhere")["verify"] != k["verify"]  # another image root is another plan


def _dataset(tmp_path):
    """The CASES images as a detection file (a Person and a Chair box on each) with one human caption each."""
    from benchmarks.synth import categories

    root = str(tmp_path / "images")
    write_cases(root)
    cats = categories()
    by_name = {c["name"]: c["id"] for c in cats}
    images, anns, caps = [], [], []
    for i, (name, (w, h, _, _)) in enumerate(CASES.items(), start=1):
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": 2 * i, "image_id": i, "category_id": by_name["Person"], "bbox": [2, 2, 30, 30]})
        anns.append(
            {"id": 2 * i + 1, "image_id": i, "category_id": by_name["Chair"], "bbox": [10, 10, 30, 30]}
        )
        caps.append({"id": i, "image_id": i, "caption": "A man sitting on a chair."})
    det, cap = tmp_path / "det.json", tmp_path / "caps.json"
    det.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    cap.write_text(json.dumps({"annotations": caps}))
    ids = {name: i for i, name in enumerate(CASES, start=1)}
    return str(det), str(cap), root, ids


@pytest.mark.flow
def test_default_path_quarantines_every_broken_image_and_labels_the_good_ones(
    prefect_harness, tmp_path, capsys
):
    from flows.cli import main
    from flows.status import find_runs

    det, cap, root, ids = _dataset(tmp_path)
    out = str(tmp_path / "out")
    rc = main(["run", "--annotations", det, "--images", root, "--captions", cap, "--out", out, "--dataset", "bad",
               "--batch-size", "5"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (run,) = find_runs(out)
    triplets = pq.read_table(run.triplets(0)).to_pylist()
    good = {ids[n] for n, c in CASES.items() if c[2] is None}
    assert {t["image_id"] for t in triplets} == good  # every good image labelled, no broken one
    assert all((t["subject_label"], t["object_label"]) == ("Person", "Chair") for t in triplets)
    found = {}
    for path in [run.quarantine("plan")] + [run.quarantine("verify", 0, b) for b in range(3)]:
        if os.path.exists(path):
            for q in schemas.from_table(pq.read_table(path), Quarantined):
                found[q.record] = (q.reason, q.stage, q.image_id)
    expected = {n: (c[2], c[3], ids[n]) for n, c in CASES.items() if c[2] is not None}
    assert found == expected
    stats = json.loads(open(run.run_stats).read())
    assert stats["plan"]["quarantined_missing_file"] == 1 and stats["plan"]["quarantined_too_large"] == 1
    assert stats["plan"]["quarantined_size_mismatch"] == 1 and stats["plan"]["quarantined_unsafe_path"] == 1
    assert stats["plan"]["quarantined_decode_error"] == 1 and stats["plan"]["images_planned"] == 7
    assert stats["stages"]["verify"]["verified"] == 6 and stats["stages"]["verify"]["quarantine_reasons"] == {
        "decode_error": 1
    }
    assert stats["stages"]["verify"]["verified_rate"] == round(6 / 7, 4)  # merged over the batches of 5 and 2
    assert stats["stages"]["caption"]["images_captioned"] == 6
