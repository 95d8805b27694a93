"""Matching yield: parsed relations that become candidates, correct mode with partitives and synonym extensions
vs without them (the correct mode before issue 21), on human-style captions; the reference matcher alongside.

Datasets: the bundled sample (examples/sample_*.json, Objects365 classes, captions written before the
extensions) and examples/real_style (COCO classes, 150 COCO-style captions). The captions go through the real
parser (the parse stage's function) once; each setting then matches the same relations. Besides the yield,
every setting's candidates are checked against the decision rules the tests pin (no candidate of a class that
is not annotated), and the losses by reason and the top unmatched heads are saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from benchmarks.common import PeakRSS, machine, save_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    "sample": (ROOT / "examples/sample_detections.json", ROOT / "examples/sample_captions.json", "o365"),
    "real_style": (
        ROOT / "examples/real_style/detections.json",
        ROOT / "examples/real_style/captions.json",
        "coco",
    ),
}
#: (name, MatchConfig fields): the baseline first
SETTINGS = [
    ("without", {"mode": "correct", "partitives": False, "extensions": False}),
    ("partitives", {"mode": "correct", "partitives": True, "extensions": False}),
    ("with", {"mode": "correct", "partitives": True, "extensions": True}),
    ("reference", {"mode": "reference"}),
]


def load(dataset: str):
    """Image records (boxes in file order, as the planner keeps them) and captions of a dataset."""
    from storage.records import Box, Caption, ImageRecord

    det_path, cap_path, vocab = DATASETS[dataset]
    det = json.loads(det_path.read_text())
    names = {c["id"]: c["name"] for c in det["categories"]}
    images = {
        im["id"]: ImageRecord(im["id"], im["file_name"], im["width"], im["height"], 0, [], [], [])
        for im in det["images"]
    }
    for pos, a in enumerate(det["annotations"]):
        im = images[a["image_id"]]
        im.boxes.append(Box(a["id"], a["category_id"], names[a["category_id"]], *a["bbox"]))
        im.box_file_index.append(pos)
        if a["category_id"] not in im.class_order:
            im.class_order.append(a["category_id"])
    per_image: dict[int, int] = {}
    captions = []
    for c in json.loads(cap_path.read_text())["annotations"]:
        k = per_image.get(c["image_id"], 0)
        per_image[c["image_id"]] = k + 1
        captions.append(Caption(c["image_id"], k, c["caption"], False, "oracle", "oracle", "oracle", c["id"]))
    return list(images.values()), captions, det["categories"], vocab


def measure(dataset: str) -> dict:
    from models.matcher import Vocabulary
    from tasks.config import MatchConfig, ParseConfig
    from tasks.stages.match import match_batch
    from tasks.stages.parse import parse_batch

    images, captions, categories, vocab_name = load(dataset)
    relations = parse_batch(captions, ParseConfig()).relations
    texts = {(c.image_id, c.caption_id): c.text for c in captions}
    out = {"images": len(images), "captions": len(captions), "relations": len(relations), "settings": {}}
    keys: dict[str, set] = {}
    for name, fields in SETTINGS:
        cfg = MatchConfig(vocabulary=vocab_name, **fields)
        vocab = Vocabulary.from_categories(categories, vocab_name, cfg.mode == "correct" and cfg.extensions)
        t0 = time.perf_counter()
        res = match_batch(images, relations, cfg, vocab, texts)
        dt = time.perf_counter() - t0
        present = {im.image_id: {b.category_id for b in im.boxes} for im in images}
        for c in res.candidates:  # a candidate names annotated boxes only
            assert (
                c.subject_category_id in present[c.image_id] and c.object_category_id in present[c.image_id]
            )
        s = res.stats
        keys[name] = {(c.image_id, c.subject_ann_id, c.object_ann_id, c.relation) for c in res.candidates}
        out["settings"][name] = {
            "relations_with_candidates": s["relations_with_candidates"],
            "yield": round(s["relations_with_candidates"] / max(1, len(relations)), 4),
            "candidates": s["candidates"],
            "pairs": s["pairs"],
            "relations_unmatched": s["relations_unmatched"],
            "top_unmatched_heads": s["top_unmatched_heads"][:10],
            "extension_candidates": s["extension_candidates"][:15],
            "partitive_matches": s["partitive_matches"],
            "match_s": round(dt, 4),
        }
    # the partitives and extensions only add: every candidate of the baseline is still there
    out["baseline_candidates_lost"] = len(keys["without"] - keys["with"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the bundled sample only")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    names = ["sample"] if args.quick else list(DATASETS)
    with PeakRSS() as mem:
        results = {d: measure(d) for d in names}
    for d, r in results.items():
        print(
            f"{d}: {r['images']} images, {r['captions']} captions, {r['relations']} parsed relations; "
            f"baseline candidates lost with partitives + extensions: {r['baseline_candidates_lost']}"
        )
        for name, s in r["settings"].items():
            print(
                f"  {name:>10}: {s['relations_with_candidates']:4d} relations -> candidates (yield {s['yield']:.3f}),"
                f" {s['candidates']} candidates; lost {s['relations_unmatched']}"
            )
    main_set = results["real_style" if "real_style" in results else "sample"]
    base, cand = main_set["settings"]["without"], main_set["settings"]["with"]
    ratio = cand["relations_with_candidates"] / max(1, base["relations_with_candidates"])
    result = {
        "name": "yield",
        "quick": args.quick,
        "speedup": round(ratio, 3),
        "what": "parsed relations that become candidates, correct mode with partitives + extensions",
        "baseline": {"name": "correct mode without partitives and extensions", "yield": base["yield"],
                     "relations_with_candidates": base["relations_with_candidates"]},
        "candidate": {"name": "correct mode with partitives and extensions", "yield": cand["yield"],
                      "relations_with_candidates": cand["relations_with_candidates"]},
        "medians": {f"{d}_{n}_match_s": s["match_s"] for d, r in results.items() for n, s in r["settings"].items()},
        "peak_memory_mib": round(mem.mb, 1),
        "datasets": results,
        "machine": machine(),
    }  # fmt: skip
    print("saved", save_result("yield", result, args.results_dir))
    print(
        f"yield: {ratio:.2f}x relations that become candidates with partitives + synonym extensions vs without "
        f"({base['yield']:.3f} -> {cand['yield']:.3f}, {'sample' if args.quick else 'real-style COCO'} captions)"
    )


if __name__ == "__main__":
    main()
