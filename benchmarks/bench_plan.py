"""Planning throughput (MB/s) and peak RSS: reltag's streaming planner vs json.load of the whole file.

Baseline: `json.load` of the detection file plus grouping annotations by image in Python dicts, which is
what pycocotools' COCO() does (and what the RLIPv2 scripts use). Both run in fresh subprocesses; peak RSS is
each process's own high-water mark (VmHWM, which exec resets; ru_maxrss can carry the parent's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for benchmarks.common

CANDIDATE = r"""
import sys, time
from storage.layout import RunLayout
from tasks.config import PlanConfig
from tasks.plan import plan_shards
t = time.perf_counter()
out = plan_shards(sys.argv[1], RunLayout(sys.argv[2], "bench", "k"), PlanConfig(shard_size=1000))
dt = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(dt, hwm * 1024, out.counts["boxes_planned"])
"""

BASELINE = r"""
import json, sys, time
from collections import defaultdict
t = time.perf_counter()
with open(sys.argv[1]) as f:
    d = json.load(f)
imgs = {im["id"]: im for im in d["images"]}
anns = defaultdict(list)
for a in d["annotations"]:
    if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0:
        anns[a["image_id"]].append(a)
dt = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(dt, hwm * 1024, sum(len(v) for v in anns.values()))
"""


def _run(code: str, *args: str) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    dt, rss, n = out.stdout.split()
    return float(dt), int(rss), int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20k and 50k images instead of 50k and 200k")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    sizes = [20_000, 50_000] if args.quick else [50_000, 200_000]
    from synth import write_detections

    from benchmarks.common import machine, save_result

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = os.path.join(tmp, f"det-{n}.json")
            meta = write_detections(path, n)
            mb = os.path.getsize(path) / 1e6
            cand, base = [], []
            for r in range(args.repeats):
                cand.append(_run(CANDIDATE, path, os.path.join(tmp, f"out-{n}-{r}")))
                base.append(_run(BASELINE, path))
            assert cand[0][2] == base[0][2], f"planner kept {cand[0][2]} boxes, baseline {base[0][2]}"
            c = sorted(cand)[len(cand) // 2]
            b = sorted(base)[len(base) // 2]
            results.append(
                {
                    "images": n,
                    "annotations": meta["annotations"],
                    "file_mb": round(mb, 1),
                    "candidate": {
                        "seconds": round(c[0], 2),
                        "mb_per_s": round(mb / c[0], 1),
                        "peak_rss_mb": round(c[1] / 1e6, 1),
                    },
                    "baseline": {
                        "seconds": round(b[0], 2),
                        "mb_per_s": round(mb / b[0], 1),
                        "peak_rss_mb": round(b[1] / 1e6, 1),
                    },
                }
            )
            os.remove(path)
            print(json.dumps(results[-1]))
    big = results[-1]
    small = results[0]
    growth_c = big["candidate"]["peak_rss_mb"] - small["candidate"]["peak_rss_mb"]
    growth_b = big["baseline"]["peak_rss_mb"] - small["baseline"]["peak_rss_mb"]
    ratio = big["baseline"]["peak_rss_mb"] / big["candidate"]["peak_rss_mb"]
    out = {
        "name": "plan",
        "speedup": round(ratio, 2),
        "speedup_means": "peak RSS of the baseline / peak RSS of reltag, on the largest file",
        "baseline": {"name": "json.load + dict grouping (pycocotools-style)", **big["baseline"]},
        "candidate": {"name": "reltag streaming planner (ijson, per-shard spill)", **big["candidate"]},
        "rss_growth_mb": {
            "candidate": round(growth_c, 1),
            "baseline": round(growth_b, 1),
            "from_images": small["images"],
            "to_images": big["images"],
        },
        "sizes": results,
        "quick": args.quick,
        "machine": machine(),
    }
    save_result("plan", out)
    print(
        f"plan: {ratio:.1f}x less peak memory vs json.load on {big['images']:,} images "
        f"({big['candidate']['peak_rss_mb']:.0f} MB vs {big['baseline']['peak_rss_mb']:.0f} MB; "
        f"{big['candidate']['mb_per_s']:.0f} MB/s vs {big['baseline']['mb_per_s']:.0f} MB/s; "
        f"RSS growth {small['images']:,}->{big['images']:,} images: {growth_c:+.0f} MB vs {growth_b:+.0f} MB)"
    )


if __name__ == "__main__":
    main()
