"""Union-region captioning (the region stage): the union crops of N pairs in micro-batched generate calls vs one
generate call per pair.

Full-size BLIP-large architecture (ViT-L/16 at 384, BERT-base text decoder; bench_caption.build_blip_large) with
random weights, offline. Beam search as the region stage runs it (one caption per union box, num_beams 3) with
min_length = max_length = 20 tokens (prompt included), so every caption has the same length and both methods do
equal work. The pairs are the bundled sample's (examples/sample_detections.json: every two boxes of an image),
the first N in image order; both methods run the stage's own function, tasks.stages.region.region_batch (crop,
caption, parse, match), from the same images:
  one_pair_per_call  region.batch_size 1: one generate call per union crop (what a naive loop does; baseline)
  batched            region.batch_size N: the crops of all N pairs in one generate call (the stage's default
                     is 32 crops per call)
Timed: wall and CPU seconds of the whole region_batch call, median over the repeats; pairs/s = N / median;
peak memory above the level before the call (RSS on CPU, torch.cuda.max_memory_allocated on cuda). The captions
of the two methods are compared (beam search is deterministic; batching may only move float rounding).

Usage: python benchmarks/bench_region.py [--quick] [--pairs N] [--repeats R] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing is downloaded

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PeakRSS, add_device_args, check_device, machine, result_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "sample_detections.json")
IMAGES = os.path.join(ROOT, "examples", "images")
LENGTH = 20  # tokens, prompt included: the region stage's default max_length (paper: 20)
BEAMS = 3


def sample_pairs(n: int):
    """(images, candidates): the sample's images with their boxes, and one candidate per unordered pair of boxes
    of an image (the first n pairs in image order)."""
    from storage.records import Box, Candidate, ImageRecord

    with open(SAMPLE) as f:
        d = json.load(f)
    names = {c["id"]: c["name"] for c in d["categories"]}
    boxes: dict[int, list] = {}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append(
            Box(a["id"], a["category_id"], names[a["category_id"]], x, y, w, h)
        )
    images, cands = [], []
    for im in d["images"]:
        bs = boxes.get(im["id"], [])
        rec = ImageRecord(im["id"], im["file_name"], im["width"], im["height"], 0, bs)
        for i, a in enumerate(bs):
            for b in bs[i + 1 :]:
                if len(cands) < n:
                    cands.append(Candidate(im["id"], a.ann_id, b.ann_id, a.category_id, b.category_id, a.label,
                                           b.label, "near", "near", [0], 1, "name", "", "name", ""))  # fmt: skip
        if any(c.image_id == im["id"] for c in cands):
            images.append(rec)
    if len(cands) < n:
        raise SystemExit(f"bench_region: the sample has {len(cands)} box pairs, fewer than --pairs {n}")
    return images, cands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 pairs, 1 timed repeat (a few minutes on 2 cores)")
    ap.add_argument(
        "--pairs", type=int, default=None, help="pairs (union crops) per run (default 16, quick 4)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="results JSON (default RESULTS_DIR/region.json)")
    add_device_args(ap)
    args = ap.parse_args()
    check_device(ap, args.device)
    args.out = args.out or result_path(args.results_dir, "region", args.device)
    n = args.pairs or (2 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    from benchmarks.bench_caption import build_blip_large
    from models.matcher import Vocabulary
    from tasks.config import MatchConfig, ParseConfig
    from tasks.stages.region import RegionConfig, region_batch

    cuda = args.device == "cuda"
    cap = build_blip_large("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    cap.n_cap, cap.num_beams = 1, BEAMS  # the region stage's captioner: beam search, one caption per crop
    cap.max_length = cap.min_length = LENGTH
    images, cands = sample_pairs(n)
    vocab = Vocabulary.from_categories(json.load(open(SAMPLE))["categories"], "o365")
    parse_cfg, match_cfg = ParseConfig(), MatchConfig()
    methods = {"one_pair_per_call": 1, "batched": n}

    def run(batch_size: int):
        cfg = RegionConfig(
            enabled=True, batch_size=batch_size, num_beams=BEAMS, max_length=LENGTH, min_length=LENGTH
        )
        return region_batch(images, cands, cap, IMAGES, cfg, parse_cfg, match_cfg, vocab)

    # warm-up: the parser, the allocator and the kernels (2 pairs, both methods' shapes)
    warm_imgs, warm_cands = images[:1], cands[:2]
    for bs in (1, 2):
        cfg = RegionConfig(enabled=True, batch_size=bs, num_beams=BEAMS, max_length=LENGTH, min_length=LENGTH)
        region_batch(warm_imgs, warm_cands, cap, IMAGES, cfg, parse_cfg, match_cfg, vocab)

    times = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    peaks = dict.fromkeys(methods, 0.0)
    texts = {}
    calls = {}
    for r in range(repeats):
        for name, bs in methods.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0, c0 = time.perf_counter(), time.process_time()
                out = run(bs)
                torch.cuda.synchronize()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                with PeakRSS() as mem:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = run(bs)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                peak = mem.mb
            assert out.stats["region_captions"] == n, (name, out.stats["region_captions"])
            times[name].append(dt)
            cpu[name].append(dc)
            peaks[name] = max(peaks[name], peak)
            texts[name] = {(row.image_id, row.caption_id): row.text for row in out.rows}
            calls[name] = out.stats["generate_calls"]
            print(
                f"[{r + 1}/{repeats}] {name}: {dt:.2f} s wall, {dc:.2f} s CPU, {n / dt:.3f} pairs/s, "
                f"{calls[name]} generate calls, peak +{peak:.0f} MiB",
                flush=True,
            )

    med = {k: statistics.median(v) for k, v in times.items()}
    pps = {k: n / v for k, v in med.items()}
    speedup = pps["batched"] / pps["one_pair_per_call"]
    same = sum(texts["one_pair_per_call"].get(k) == t for k, t in texts["batched"].items())

    def entry(name):
        return {"name": name, "pairs_per_call": methods[name], "generate_calls": calls[name],
                "median_s": med[name], "pairs_per_s": pps[name], "all_s": times[name], "cpu_s": cpu[name]}  # fmt: skip

    result = {
        "benchmark": "region",
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "workload": {
            "model": "BLIP-large architecture (ViT-L/16 384, BERT-base decoder), random weights, "
            + ("bf16 on the GPU" if cuda else "fp32"),
            "pairs": n,
            "images": len(images),
            "pairs_from": "examples/sample_detections.json: every two boxes of an image, the first N in image order",
            "decoding": {
                "mode": "beam",
                "num_beams": BEAMS,
                "min_length": LENGTH,
                "max_length": LENGTH,
                "prompt_tokens": len(cap.prompt_ids),
            },  # fmt: skip
            "timed": "tasks.stages.region.region_batch: decode the images, crop the union boxes, caption, parse, match",
            "repeats": repeats,
        },
        "speedup": round(speedup, 3),
        "speedup_means": "pairs/s batched / pairs/s one_pair_per_call (medians over the repeats)",
        "speedup_cpu_time": round(
            statistics.median(cpu["one_pair_per_call"]) / statistics.median(cpu["batched"]), 3
        ),
        "baseline": entry("one_pair_per_call"),
        "candidate": entry("batched"),
        "identical_captions": {"same": same, "of": n},
        "peak_memory_mb": {k: round(v, 1) for k, v in peaks.items()},
        "peak_memory_note": (
            "torch.cuda.max_memory_allocated above the level before the call"
            if cuda
            else "peak RSS above the level before the call, sampled every 1 ms (CPU)"
        ),
        "machine": machine(
            transformers=__import__("transformers").__version__,
            loadavg_1_5_15_before=[round(x, 2) for x in load_before],
        ),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")
    print(
        f"batched {pps['batched']:.3f} pairs/s ({n} crops per call), one pair per call "
        f"{pps['one_pair_per_call']:.3f} pairs/s; peak +{peaks['batched']:.0f} vs +{peaks['one_pair_per_call']:.0f} "
        f"MiB; captions identical {same}/{n}"
    )
    print(f"region: {speedup:.1f}x pairs/s batched vs one pair per call")


if __name__ == "__main__":
    main()
