"""Planning a run: checksums -> run key -> shards -> manifest (written last). A planned run is not replanned."""

from __future__ import annotations

import re
import time

from storage.atomic import read_json, write_json
from storage.layout import RunLayout
from tasks.config import PipelineConfig
from tasks.pipeline import RunContext
from tasks.plan import file_checksum, plan_shards
from tasks.revisions import revisions, run_key, versions


def cached_checksum(path: str, cache_root: str) -> tuple[str, int]:
    """sha256 of an input file, cached under the output root by (path, size, modification time or ETag).

    Re-hashing a multi-GB annotation file on every rerun would cost more than the rerun itself.
    """
    import posixpath

    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    info = fs.info(p)
    stamp = [info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]
    out_fs, out_base = url_to_fs(cache_root)
    cache_path = posixpath.join(out_base, "_checksums.json")
    cache = read_json(out_fs, cache_path) if out_fs.exists(cache_path) else {}
    hit = cache.get(path)
    if stamp[1] and hit and hit["stamp"] == stamp:
        return hit["sha256"], hit["bytes"]
    sha, n = file_checksum(path)
    if stamp[1]:
        cache[path] = {"stamp": stamp, "sha256": sha, "bytes": n}
        write_json(out_fs, cache_path, cache)
    return sha, n


def plan_run(
    annotations: str, images: str, out: str, captions: str | None, dataset: str, cfg: PipelineConfig
) -> tuple[RunContext, dict]:
    """Return the run's context and manifest, planning it first unless its manifest already exists."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dataset):
        raise ValueError(
            f"dataset name {dataset!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
        )
    names = cfg.caption.captioner if isinstance(cfg.caption.captioner, tuple) else (cfg.caption.captioner,)
    if "oracle" in names and not captions:
        raise ValueError("captioner 'oracle' needs a captions file (--captions, COCO-Captions JSON)")
    ann_sha, ann_bytes = cached_checksum(annotations, out)
    inputs = {"annotations_sha256": ann_sha}
    cap_sha = None
    if captions and "oracle" in names:
        cap_sha, _ = cached_checksum(captions, out)
        inputs["captions_sha256"] = cap_sha
    revs = revisions(cfg, cap_sha)
    key = run_key(cfg, inputs, revs)
    layout = RunLayout(out, dataset, key)
    ctx = RunContext(out, dataset, key, images, captions, cfg.model_dump_json())
    if layout.fs.exists(layout.manifest):
        return ctx, read_json(layout.fs, layout.manifest)
    t0 = time.perf_counter()
    outcome = plan_shards(annotations, layout, cfg.plan)
    manifest = {
        "run_key": key,
        "dataset": dataset,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            "annotations": {"path": annotations, "sha256": ann_sha, "bytes": ann_bytes},
            "captions": {"path": captions, "sha256": cap_sha} if captions else None,
            "images_root": images,
        },
        "categories": outcome.categories,
        "shards": outcome.shards,
        "counts": dict(outcome.counts),
        "quarantined": outcome.n_quarantined,
        "config": cfg.model_dump(mode="json"),
        "revisions": revs,
        "versions": versions(),
        "plan_seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(layout.fs, layout.manifest, manifest)
    return ctx, manifest
