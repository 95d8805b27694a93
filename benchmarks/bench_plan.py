"""Planning throughput (MB/s) and peak RSS: reltag's streaming planner vs json.load of the whole file; and
the image checks: header checks at planning and full decodes in the verify stage, thread pool vs one thread.

Baseline: `json.load` of the detection file plus grouping annotations by image in Python dicts, which is
what pycocotools' COCO() does (and what the RLIPv2 scripts use). Both run in fresh subprocesses; peak RSS is
each process's own high-water mark (VmHWM, which exec resets; ru_maxrss can carry the parent's).

Image checks ("header_checks", "decodes" in the results): the same images checked by one thread (baseline:
check_header / decode one after the other) and by the planner's object-store pool (PlanConfig.header_threads). The
header files are hard links of a few 640x480 JPEGs (each name is resolved, opened and parsed on its own; the
bytes are in the page cache, as they are right after a copy: a cold disk or object storage adds latency that
threads hide better than shown here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for benchmarks.common

CANDIDATE = r"""
import sys, time
from storage.layout import RunLayout
from tasks.config import PlanConfig
from tasks.stages.plan import plan_shards
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


def _photos(n: int) -> list[bytes]:
    """n distinct 640x480 JPEGs (quality 90) cut from the bundled sample photographs."""
    import io

    from PIL import Image

    from benchmarks.common import IMAGES_DIR

    srcs = sorted(os.listdir(IMAGES_DIR))
    out = []
    for k in range(n):
        im = Image.open(os.path.join(IMAGES_DIR, srcs[k % len(srcs)])).convert("RGB").resize((640, 480))
        if k >= len(srcs):
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def image_checks(tmp: str, n_headers: int, n_decodes: int, threads: int, repeats: int = 3) -> dict:
    """Images per second of header checks (plan) and full decodes (verify stage): one thread vs a pool."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.records import ImageRecord
    from tasks.images import check_header
    from tasks.stages.verify import verify_batch

    root = os.path.join(tmp, "images")
    os.makedirs(root)
    blobs = _photos(10)
    for k, b in enumerate(blobs):
        with open(os.path.join(root, f"src-{k}.jpg"), "wb") as f:
            f.write(b)
    names = [f"h/{k // 1000:03d}/{k:07d}.jpg" for k in range(n_headers)]
    for k, name in enumerate(names):
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        os.link(os.path.join(root, f"src-{k % len(blobs)}.jpg"), os.path.join(root, name))

    def one(name):
        return check_header(root, name).width

    recs = [ImageRecord(k, names[k], 640, 480, 0) for k in range(n_decodes)]
    # best of `repeats`, one thread and the pool interleaved: the machine may be shared (load in "machine")
    t_seq = t_par = d_seq = d_par = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            seq = [one(n) for n in names]
            t_seq = min(t_seq, time.perf_counter() - t)
            t = time.perf_counter()
            par = list(pool.map(one, names))
            t_par = min(t_par, time.perf_counter() - t)
            assert seq == par == [640] * n_headers
            t = time.perf_counter()
            v1, q1, _ = verify_batch(recs, root, 10**8, threads=1)
            d_seq = min(d_seq, time.perf_counter() - t)
            t = time.perf_counter()
            vn, qn, _ = verify_batch(recs, root, 10**8, threads=threads)
            d_par = min(d_par, time.perf_counter() - t)
            assert v1 == vn and not q1 and not qn and len(v1) == n_decodes
    mean_kb = sum(len(b) for b in blobs) / len(blobs) / 1e3
    return {
        "header_checks": {
            "images": n_headers,
            "repeats": repeats,
            "baseline": {"name": "check_header, one thread", "images_per_s": round(n_headers / t_seq)},
            "candidate": {
                "name": f"check_header, {threads} threads",
                "images_per_s": round(n_headers / t_par),
            },
            "speedup": round(t_seq / t_par, 2),
        },
        "decodes": {
            "images": n_decodes,
            "image": f"640x480 JPEG, {mean_kb:.0f} kB on average",
            "baseline": {"name": "verify_batch, one thread", "images_per_s": round(n_decodes / d_seq, 1)},
            "candidate": {
                "name": f"verify_batch, {threads} threads",
                "images_per_s": round(n_decodes / d_par, 1),
            },
            "speedup": round(d_seq / d_par, 2),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20k and 50k images instead of 50k and 200k")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--results-dir", default=None, help="where plan.json goes (default benchmarks/results)")
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
        from tasks.config import PlanConfig

        # the pool size the planner uses on object stores; on local disk it checks headers in one thread
        threads = PlanConfig().header_threads("s3://bucket/images")
        n_h, n_d = (5_000, 200) if args.quick else (50_000, 1_000)
        checks = image_checks(tmp, n_h, n_d, threads, repeats=max(3, args.repeats))
        print(json.dumps(checks))
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
        **checks,
        "quick": args.quick,
        "machine": machine(),
    }
    save_result("plan", out, args.results_dir)
    print(
        f"plan: {ratio:.1f}x less peak memory vs json.load on {big['images']:,} images "
        f"({big['candidate']['peak_rss_mb']:.0f} MB vs {big['baseline']['peak_rss_mb']:.0f} MB; "
        f"{big['candidate']['mb_per_s']:.0f} MB/s vs {big['baseline']['mb_per_s']:.0f} MB/s; "
        f"RSS growth {small['images']:,}->{big['images']:,} images: {growth_c:+.0f} MB vs {growth_b:+.0f} MB)"
    )
    h, d = checks["header_checks"], checks["decodes"]
    print(
        f"image checks: headers {h['candidate']['images_per_s']:,} images/s with {threads} threads vs "
        f"{h['baseline']['images_per_s']:,} with one ({h['speedup']:.2f}x); full decodes "
        f"{d['candidate']['images_per_s']:,} images/s vs {d['baseline']['images_per_s']:,} ({d['speedup']:.2f}x)"
    )


if __name__ == "__main__":
    main()
