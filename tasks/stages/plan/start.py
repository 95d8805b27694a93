"""Planning a run: checksums -> keys (plan and stage chain) -> shards -> plan manifest and run record."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import NamedTuple

from models.captioners.oracle import OracleCaptioner
from storage.atomic import read_json, write_json
from storage.manifest import ChainLink, PlanManifest, RunRecord, ShardInfo
from tasks.config import PipelineConfig
from tasks.run.context import RunContext
from tasks.run.leases import LEASE_POLL, leases
from tasks.run.registry import chain, folders, revisions
from tasks.run.revisions import versions
from tasks.stages.caption import require_captions_file, uses_human_captions
from tasks.stages.plan import file_checksum, plan_shards, read_categories


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


def _stamp(path: str) -> list:
    """(size, modification time or ETag) of an input file: what says it has not changed."""
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    info = fs.info(p)
    return [info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]


def cached_categories(path: str, cache_root: str) -> list[dict]:
    """The annotation file's validated `categories`, cached under the output root like its checksum.

    Reading them streams the whole file (COCO and Objects365 put them last), which also finds broken JSON
    before any work; a rerun reads the cache instead.
    """
    import posixpath

    from fsspec.core import url_to_fs

    stamp = _stamp(path)
    out_fs, out_base = url_to_fs(cache_root)
    cache_path = posixpath.join(out_base, "_categories.json")
    cache = read_json(out_fs, cache_path) if out_fs.exists(cache_path) else {}
    hit = cache.get(path)
    if stamp[1] and hit and hit["stamp"] == stamp:
        return hit["categories"]
    categories = read_categories(path)
    if stamp[1]:
        cache[path] = {"stamp": stamp, "categories": categories}
        write_json(out_fs, cache_path, cache)
    return categories


def check_inputs(annotations: str, images: str, captions: str | None, cfg: PipelineConfig, run: bool) -> None:
    """The inputs a run needs, checked before any work: each problem is one ValueError naming the path.

    The image folder must exist and hold something (a mistyped folder would otherwise go unnoticed by runs
    that never open an image: human captions and the greedy tagger). A run with human captions needs its
    captions file (`run`; `reltag plan` plans without one); validate_captions reads it.
    """
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(annotations)
    if not fs.exists(p):
        raise ValueError(f"annotations file {annotations} does not exist")
    if fs.isdir(p):
        raise ValueError(f"annotations file {annotations} is a folder, not a detection JSON file")
    fs, p = url_to_fs(images)
    if not fs.exists(p):
        raise ValueError(f"image folder {images} does not exist")
    if not fs.isdir(p):
        raise ValueError(f"image folder {images} is not a folder")
    if _is_empty(fs, p):
        raise ValueError(f"image folder {images} is empty")
    if captions is None:
        if run:
            require_captions_file(cfg.caption, captions)
        return
    fs, p = url_to_fs(captions)
    if not fs.exists(p):
        raise ValueError(f"captions file {captions} does not exist")
    if fs.isdir(p):
        raise ValueError(f"captions file {captions} is a folder, not a COCO-Captions JSON file")


def validate_captions(captions: str | None, cfg: PipelineConfig) -> None:
    """The human captions file read and validated as the caption stage will (broken JSON, a record without a
    caption or with a non-integer id): a ValueError naming the file and record, before any work."""
    if captions is not None and uses_human_captions(cfg.caption):
        OracleCaptioner(captions)


def _is_empty(fs, path: str) -> bool:
    """Whether a folder holds nothing; a local folder of a million images is not listed for that."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        with os.scandir(path) as it:
            return next(it, None) is None
    return not fs.ls(path, detail=False)


class RunInputs(NamedTuple):
    """A run's context, its chain of stage keys and the input checksums they were computed from (each input
    file is read or looked up once)."""

    ctx: RunContext
    links: list[ChainLink]
    annotations_sha256: str
    annotations_bytes: int
    captions_sha256: str | None


def canonical_root(root: str) -> str:
    """The image root as the plan key sees it: a local folder (plain or file://) as its absolute real path,
    so that `imgs`, `./imgs`, `/data/imgs` and `file:///data/imgs` are one plan; any other URI as given."""
    if root.startswith("file://"):
        root = root[len("file://") :]
    elif "://" in root:
        return root.rstrip("/")
    return os.path.realpath(root)


def run_context(
    annotations: str,
    images: str,
    out: str,
    captions: str | None,
    dataset: str,
    cfg: PipelineConfig,
    need_captions: bool = True,
) -> RunInputs:
    """The run's context (its keys, from the input checksums and the config) without planning anything.
    need_captions=False: human captions may be missing (the plan's key is right, the stage keys are not)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dataset):
        raise ValueError(
            f"dataset name {dataset!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
        )
    if need_captions:
        require_captions_file(cfg.caption, captions)
    ann_sha, ann_bytes = cached_checksum(annotations, out)
    inputs = {"annotations_sha256": ann_sha, "images_root": canonical_root(images)}
    cap_sha = None
    if captions and uses_human_captions(cfg.caption):
        cap_sha, _ = cached_checksum(captions, out)
        inputs["captions_sha256"] = cap_sha
    pkey, links = chain(cfg, inputs)
    keys = tuple((link.stage, link.key) for link in links)
    ctx = RunContext(
        out, dataset, links[-1].key, images, captions, cfg.model_dump_json(), pkey, keys, folders()
    )
    return RunInputs(ctx, links, ann_sha, ann_bytes, cap_sha)


def plan_run(
    annotations: str,
    images: str,
    out: str,
    captions: str | None,
    dataset: str,
    cfg: PipelineConfig,
    record_run: bool = True,
) -> tuple[RunContext, PlanManifest]:
    """The run's context and its plan: plans first unless the plan exists, records the run unless recorded.

    The plan is keyed by the plan settings and the annotation file's checksum; the run by its chain of stage
    keys (tasks/run/registry.py). Both records are written last and atomically, and neither is ever rewritten.
    record_run=False plans alone (`reltag plan` without the captions file that names a human-caption run); the
    context's plan key and layout are then right, its run and stage keys are not.
    """
    ctx, links, ann_sha, ann_bytes, cap_sha = run_context(
        annotations, images, out, captions, dataset, cfg, need_captions=record_run
    )
    pkey, run_key = ctx.plan_key, ctx.run_key
    layout = ctx.layout
    plan = _planned_or_claim(layout)
    if plan is None:  # this process holds the plan's lease: plan, then release it
        try:
            t0 = time.perf_counter()
            outcome = plan_shards(annotations, layout, cfg.plan, images_root=images)
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
    _some_image_usable(plan, annotations, images, layout)
    if record_run and not layout.fs.exists(layout.manifest):
        if captions and uses_human_captions(cfg.caption):
            check_captions(captions, annotations, layout, plan)  # once per run, before it is recorded
        record = RunRecord(
            run_key=run_key,
            dataset=dataset,
            plan_key=pkey,
            created_at=_now(),
            chain=links,
            config=cfg.model_dump(mode="json"),
            revisions=revisions(cfg, {"captions_sha256": cap_sha}),
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
#: Below this share of planned images with captions, a warning says how many are covered.
CAPTION_COVERAGE_WARNING = 0.5
log = logging.getLogger("reltag.inputs")


def _some_image_usable(plan: PlanManifest, annotations: str, images: str, layout) -> None:
    """ValueError (one line) when the file has images and planning quarantined every one of them: a wrong
    --images folder, or a dataset with no usable image, is an input error, not a run of nothing."""
    c = plan.counts
    if c.get("images_planned", 0) or not c.get("images_in_file", 0):
        return
    reasons = sorted(((k[len("quarantined_") :], v) for k, v in c.items() if k.startswith("quarantined_")),
                     key=lambda kv: -kv[1])  # fmt: skip
    why = ", ".join(f"{v} {k}" for k, v in reasons[:4]) or "no reason recorded"
    raise ValueError(
        f"none of the {c['images_in_file']} images of {annotations} can be used with --images {images} ({why}; "
        f"{layout.quarantine('plan')} lists each): is it the right image folder?"
    )


def caption_image_ids(captions: str) -> set[int]:
    """The image ids of a COCO-Captions file (streamed); ValueError in one line when it is not one."""
    import fsspec
    import ijson

    ids: set[int] = set()
    with fsspec.open(captions, "rb") as f:
        try:
            for v in ijson.items(f, "annotations.item.image_id"):
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
        except ijson.common.JSONError as e:
            first = " ".join(str(e).split("\n")[0].split())
            raise ValueError(f"captions file {captions} is not valid JSON: {first}") from e
    return ids


def check_captions(captions: str, annotations: str, layout, plan: PlanManifest) -> int:
    """How many planned images the captions file covers. None: ValueError (one line); under
    CAPTION_COVERAGE_WARNING of them: a warning with the count (logger reltag.inputs, stderr by default)."""
    import pyarrow.parquet as pq

    have = caption_image_ids(captions)
    planned = matched = 0
    for sh in plan.shards:
        with layout.fs.open(layout.images(sh.shard), "rb") as f:
            ids = pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
        planned += len(ids)
        matched += sum(1 for i in ids if i in have)
    if planned and not matched:
        raise ValueError(
            f"captions file {captions}: none of its {len(have)} image ids matches any of the {planned} planned "
            f"images of {annotations} (captions of another dataset or split?)"
        )
    if planned and matched < CAPTION_COVERAGE_WARNING * planned:
        log.warning(
            "warning: captions file %s covers only %d of %d planned images (%.1f%%); the others get no captions",
            captions, matched, planned, 100.0 * matched / planned,
        )  # fmt: skip
    return matched


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
