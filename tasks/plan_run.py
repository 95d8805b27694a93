"""Planning a run: checksums -> keys (plan and stage chain) -> shards -> plan manifest and run record."""

from __future__ import annotations

import re
import time
from typing import NamedTuple

from storage.atomic import read_json, write_json
from storage.manifest import ChainLink, PlanManifest, RunRecord, ShardInfo
from tasks.caption import captioner_names
from tasks.config import PipelineConfig
from tasks.context import RunContext
from tasks.pipeline import LEASE_POLL, leases
from tasks.plan import file_checksum, plan_shards
from tasks.revisions import revisions, versions
from tasks.stages import chain


def cached_checksum(path: str, cache_root: str) -> tuple[str, int]:
    """sha256 of an input file, cached under the output root by (path, size, modification time or ETag).

    Re-hashing a multi-GB annotation file on every rerun would cost more than the rerun itself.
    """
    import posixpath

    from fsspec.core import url_to_fs

    from storage.retry import retrying

    fs, p = url_to_fs(path)
    info = retrying(fs).info(p)
    stamp = [info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]
    out_fs, out_base = url_to_fs(cache_root)
    out_fs = retrying(out_fs)
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


class RunInputs(NamedTuple):
    """A run's context, its chain of stage keys and the input checksums they were computed from (each input
    file is read or looked up once)."""

    ctx: RunContext
    links: list[ChainLink]
    annotations_sha256: str
    annotations_bytes: int
    captions_sha256: str | None


def run_context(
    annotations: str, images: str, out: str, captions: str | None, dataset: str, cfg: PipelineConfig
) -> RunInputs:
    """The run's context (its keys, from the input checksums and the config) without planning anything."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dataset):
        raise ValueError(
            f"dataset name {dataset!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
        )
    names = captioner_names(cfg.caption)
    if "oracle" in names and not captions:
        raise ValueError("captioner 'oracle' needs a captions file (--captions, COCO-Captions JSON)")
    ann_sha, ann_bytes = cached_checksum(annotations, out)
    inputs = {"annotations_sha256": ann_sha}
    cap_sha = None
    if captions and "oracle" in names:
        cap_sha, _ = cached_checksum(captions, out)
        inputs["captions_sha256"] = cap_sha
    pkey, links = chain(cfg, inputs)
    keys = tuple((link.stage, link.key) for link in links)
    ctx = RunContext(out, dataset, links[-1].key, images, captions, cfg.model_dump_json(), pkey, keys)
    return RunInputs(ctx, links, ann_sha, ann_bytes, cap_sha)


def plan_run(
    annotations: str, images: str, out: str, captions: str | None, dataset: str, cfg: PipelineConfig
) -> tuple[RunContext, PlanManifest]:
    """The run's context and its plan: plans first unless the plan exists, records the run unless recorded.

    The plan is keyed by the plan settings and the annotation file's checksum; the run by its chain of stage
    keys (tasks/stages.py). Both records are written last and atomically, and neither is ever rewritten.
    """
    ctx, links, ann_sha, ann_bytes, cap_sha = run_context(annotations, images, out, captions, dataset, cfg)
    pkey, run_key = ctx.plan_key, ctx.run_key
    layout = ctx.layout
    plan = _planned_or_claim(layout)
    if plan is None:  # this process holds the plan's lease: plan, then release it
        try:
            t0 = time.perf_counter()
            outcome = plan_shards(annotations, layout, cfg.plan)
            plan = PlanManifest(
                plan_key=pkey,
                dataset=dataset,
                created_at=_now(),
                inputs={
                    "annotations": {"path": annotations, "sha256": ann_sha, "bytes": ann_bytes},
                    "images_root": images,
                },
                categories=outcome.categories,
                shards=[ShardInfo.from_dict(sh) for sh in outcome.shards],
                counts=dict(outcome.counts),
                quarantined=outcome.n_quarantined,
                plan=cfg.plan.model_dump(mode="json"),
                versions=versions(),
                plan_seconds=round(time.perf_counter() - t0, 3),
            )
            write_json(layout.fs, layout.plan_manifest, plan.to_dict())
        finally:
            leases(layout).release(PLAN_LEASE)
    if not layout.fs.exists(layout.manifest):
        record = RunRecord(
            run_key=run_key,
            dataset=dataset,
            plan_key=pkey,
            created_at=_now(),
            chain=links,
            config=cfg.model_dump(mode="json"),
            revisions=revisions(cfg, cap_sha),
            versions=versions(),
            inputs={
                **plan.inputs,
                "images_root": images,
                "captions": {"path": captions, "sha256": cap_sha} if captions else None,
            },
        )
        write_json(layout.fs, layout.manifest, record.to_dict())
    return ctx, plan


PLAN_LEASE = "plan"


def _planned_or_claim(layout) -> PlanManifest | None:
    """The plan if it exists; None once this process holds the plan's lease (it must plan). A plan that
    another process is writing is waited for, so two runs started together plan once."""
    held = leases(layout)
    while True:
        if layout.fs.exists(layout.plan_manifest):
            return PlanManifest.from_dict(read_json(layout.fs, layout.plan_manifest))
        if held.claim(PLAN_LEASE):
            if layout.fs.exists(layout.plan_manifest):
                held.release(PLAN_LEASE)
                continue
            return None
        time.sleep(LEASE_POLL)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
