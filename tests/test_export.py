"""`reltag export`: the reference's VG-style JSON read back by a plainly written loader, the flat Parquet copy
through HF datasets and DuckDB, atomic output, refusals."""

from __future__ import annotations

import json
import os
from importlib import resources

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from flows.status import find_runs
from models.rlipv2.data import RelationDataset
from storage.relations import RunSource
from tests.test_relations import CHAIR, HAT, PERSON, img, make_run, trip

KEYS = ["image_id", "dataset", "data_split", "objects", "relationships"]


def plain_reference_load(path, eta, sizes, num_pairs=100):
    """The reference loader's steps over the exported JSON, written out plainly: confidence >= eta (rows without
    one kept), empty images dropped, the first 100 relations, xyxy boxes clamped in float32 tensors, unique names
    and predicates first seen first, pairs merged into multi-hot vectors first seen first."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for im in data:
        rels = [r for r in im["relationships"] if "confidence" not in r or r["confidence"] >= eta]
        if not rels:
            continue
        rels = rels[:num_pairs]
        w, h = sizes[im["image_id"]]
        boxes = torch.as_tensor(
            [[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]] for o in im["objects"]], dtype=torch.float32
        ).reshape(-1, 4)
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        names, preds = [], []
        for o in im["objects"]:
            if o["names"] not in names:
                names.append(o["names"])
        for r in rels:
            if r["predicate"] not in preds:
                preds.append(r["predicate"])
        pairs, labels = [], []
        for r in rels:
            p = (r["subject_id"], r["object_id"])
            if p not in pairs:
                pairs.append(p)
                labels.append([0] * len(preds))
            labels[pairs.index(p)][preds.index(r["predicate"])] = 1
        out.append(
            {"image_id": im["image_id"], "dataset": im["dataset"], "names": names, "preds": preds, "pairs": pairs,
             "labels": labels, "boxes": boxes.tolist(), "object_ids": [o["object_id"] for o in im["objects"]]}
        )  # fmt: skip
    return out


def from_dataset(ds):
    return [
        {"image_id": i.image_id, "dataset": i.dataset, "names": i.object_texts, "preds": i.relation_texts,
         "pairs": i.pairs, "labels": i.pair_labels, "boxes": [o.xyxy for o in i.objects],
         "object_ids": [o.object_id for o in i.objects]}
        for i in ds
    ]  # fmt: skip


def o365_keys() -> list[str]:
    """The o365 class keys read straight from the bundled paraphrase file (category id = position + 1)."""
    text = (
        resources.files("models.data.synonyms")
        .joinpath("o365_obj_paraphrase.json")
        .read_text(encoding="utf-8")
    )
    return list(json.loads(text))


@pytest.mark.flow
def test_export_of_a_real_run_round_trips_through_a_plain_loader(prefect_harness, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out]) == 0
    (run,) = find_runs(out)
    dest = str(tmp_path / "rel.json")
    capsys.readouterr()
    assert (
        main(["export", "--out", out, "--format", "vg-json", "--eta", "0.2", "--rule", "relation_only", dest])
        == 0
    )
    msg = capsys.readouterr().out
    with open(dest) as f:
        data = json.load(f)
    assert f"wrote {dest}: {len(data)} images" in msg
    # the plan's images, read plainly: every box of an exported image is listed, under its class key
    plan_images = {r["image_id"]: r for r in pq.read_table(run.images(0)).to_pylist()}
    keys = o365_keys()
    trips = pq.read_table(run.triplets(0)).to_pylist()
    kept_rows = [t for t in trips if float(t["p_relation"]) >= 0.2]
    assert [im["image_id"] for im in data] == sorted({t["image_id"] for t in kept_rows})
    assert sum(len(im["relationships"]) for im in data) == len(kept_rows)
    rel_id = 0
    for im in data:
        assert list(im) == KEYS and im["dataset"] == "o365" and im["data_split"] == "images"
        boxes = plan_images[im["image_id"]]["boxes"]
        assert [(o["object_id"], o["names"], o["x"], o["y"], o["w"], o["h"]) for o in im["objects"]] == [
            (b["ann_id"], keys[b["category_id"] - 1], b["x"], b["y"], b["w"], b["h"]) for b in boxes
        ]
        assert all(list(o) == ["object_id", "x", "y", "w", "h", "names"] for o in im["objects"])
        mine = [t for t in kept_rows if t["image_id"] == im["image_id"]]
        for r, t in zip(im["relationships"], mine, strict=True):
            assert list(r) == ["relationship_id", "predicate", "subject_id", "object_id", "confidence"]
            assert (r["relationship_id"], r["predicate"], r["subject_id"], r["object_id"]) == (
                rel_id, t["relation"], t["subject_ann_id"], t["object_ann_id"])  # fmt: skip
            assert r["confidence"] == float(np.float32(t["p_relation"]))
            rel_id += 1
    sizes = {i: (r["width"], r["height"]) for i, r in plan_images.items()}
    ds = RelationDataset([run.base], eta=0.2, rule="relation_only")
    assert plain_reference_load(dest, 0.2, sizes) == from_dataset(ds)
    assert len(data) == len(ds) > 0


def test_export_round_trip_with_the_cap_duplicates_and_clamping(tmp_path):
    """130 rows in one image (20 below eta, 30 duplicates, 80 distinct), boxes leaving the image, a box in no
    relation, a second image left empty at eta: the exported file holds every row that passes (no cap), and the
    plain loader's reading of it equals the dataset's items (cap, merge, clamp)."""
    boxes = [(1, HAT, -5, 0, 20, 10), (2, PERSON, 90, 40, 30, 30), (3, HAT, 0, 0, 5, 5)]
    boxes += [(a, CHAIR, 0, 0, 5, 5) for a in range(4, 12)] + [(12, 6, 200, 200, 5, 5)]
    rows = [trip(1, 1, 2, f"a{i}", 0.1) for i in range(20)] + [trip(1, 1, 2, "on", 0.9) for _ in range(30)]
    rows += [trip(1, 3, 4 + j // 10, f"r{j % 10}", 0.9) for j in range(80)] + [trip(2, 1, 2, "low", 0.15)]
    plan = make_run(tmp_path, [([img(1, boxes), img(2, boxes)], rows)])
    src = RunSource(plan, "run0")
    dest = str(tmp_path / "out" / "rel.json")
    from tasks.audit.export import export_vg_json

    paths = str(tmp_path / "out" / "image_id_to_filepath.json")
    counts = export_vg_json(src, dest, 0.2, "relation_only", image_paths=paths)
    assert counts["images"] == 1 and counts["relationships"] == 110 and counts["objects"] == 12
    with open(paths) as f:
        assert json.load(f) == {"1": "im1.jpg"}  # image 2 has nothing left at eta: not exported
    ds = RelationDataset([src])
    loaded = plain_reference_load(dest, 0.2, {1: (100, 50), 2: (100, 50)})
    assert loaded == from_dataset(ds)
    assert loaded[0]["pairs"] == [(1, 2)] + [(3, k) for k in range(4, 11)]
    assert loaded[0]["boxes"][:2] == [[0, 0, 15, 10], [90, 40, 100, 50]] and loaded[0]["boxes"][-1] == [
        100,
        50,
        100,
        50,
    ]


def test_parquet_export_loads_in_hf_datasets_and_duckdb(tmp_path):
    import datasets
    import duckdb

    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    shards = [
        ([img(1, b), img(2, b)], [trip(1, 1, 2, "on", 0.9), trip(1, 2, 1, "low", 0.1), trip(2, 1, 2, "x", 0.5, p_s=0.5)]),
        ([img(3, b)], [trip(3, 1, 2, "near", 0.25, p_s=0.5, p_o=0.5)]),
    ]  # fmt: skip
    root = tmp_path / "root"
    make_run(root, shards, run_key="abc123")
    dest = str(tmp_path / "flat.parquet")
    assert (
        main(["export", "--out", str(root), "--run", "abc", "--format", "parquet", "--eta", "0.2", dest]) == 0
    )
    d = datasets.load_dataset("parquet", data_files=dest, split="train", cache_dir=str(tmp_path / "hf"))
    # p_relation >= 0.2, by hand: "on" 0.9, "x" 0.5, "near" 0.25
    assert [(r["image_id"], r["relation"]) for r in d] == [(1, "on"), (2, "x"), (3, "near")]
    assert np.allclose([r["confidence"] for r in d], [0.9, 0.5, 0.25]) and d[0]["subject_box"] == [
        0,
        0,
        10,
        10,
    ]
    q = f"select image_id, relation, confidence from read_parquet('{dest}') order by image_id"
    assert [(i, r) for i, r, _ in duckdb.sql(q).fetchall()] == [(1, "on"), (2, "x"), (3, "near")]
    # the paper's rule: 0.9, 0.25, 0.0625 -> "on" and "x"; confidence holds the product
    assert main(["export", "--out", str(root), "--format", "parquet", "--rule", "paper", dest]) == 0
    t = pq.read_table(dest).to_pylist()
    assert [(r["relation"], r["confidence"]) for r in t] == [("on", pytest.approx(0.9)), ("x", 0.25)]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import tasks.audit.export as ex

    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    plan = make_run(
        tmp_path / "r", [([img(i, b) for i in range(3)], [trip(i, 1, 2, "on", 0.9) for i in range(3)])]
    )
    real = ex.vg_json_image
    calls = []

    def boom(rec, first):
        calls.append(rec.image_id)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(rec, first)

    monkeypatch.setattr(ex, "vg_json_image", boom)
    dest = tmp_path / "out" / "rel.json"
    with pytest.raises(OSError, match="disk full"):
        ex.export_vg_json(plan, str(dest), image_paths=str(tmp_path / "out" / "paths.json"))
    assert os.listdir(tmp_path / "out") == []


def test_export_refuses_an_unfinished_run_with_one_line(tmp_path, capsys):
    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    make_run(tmp_path, [([img(1, b)], [trip(1, 1, 2, "on", 0.9)])] * 2, finished=False)
    dest = tmp_path / "x.json"
    assert main(["export", "--out", str(tmp_path), "--format", "vg-json", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("reltag export: error: run run0")
        and "2 of 2 shards have no 'write' record [0, 1]" in err
    )
    assert "\n" not in err and not dest.exists()
    assert main(["export", "--out", str(tmp_path / "none"), str(dest)]) == 2
    assert capsys.readouterr().err == f"reltag export: error: no runs under {tmp_path / 'none'}\n"
    assert (
        main(["export", "--out", str(tmp_path), "--format", "parquet", "--image-paths", "p.json", str(dest)])
        == 2
    )
    assert "--image-paths goes with --format vg-json" in capsys.readouterr().err
