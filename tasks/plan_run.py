"""Planning a run: checksums -> keys (plan and stage chain) -> shards -> plan manifest and run record."""

from __future__ import annotations

import re
import time
from typing import NamedTuple

from storage.atomic import read_json, write_json
from storage.layout import RunLayout
from storage.manifest import ChainLink, PlanManifest, RunRecord, ShardInfo
from tasks.caption import captioner_names
from tasks.config import PipelineConfig
from tasks.context import RunContext
from tasks.pipeline import LEASE_POLL, leases
from tasks.plan import file_checksum, plan_shards, read_categories
from tasks.revisions import revisions, versions
from tasks.stages import chain, folders, plan_key


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


def _stamp(path: str):
    """(fs, path in it, (size, modification time or ETag)) of an input file."""
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    info = fs.info(p)
    return (
        fs,
        p,
        [info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")],
    )


def cached_categories(path: str, cache_root: str) -> list[dict]:
    """The annotation file's validated `categories`, cached under the output root like its checksum.

    Reading them streams the whole file (COCO and Objects365 put them last), which also finds broken JSON
    before any work; a rerun reads the cache instead.
    """
    import posixpath

    from fsspec.core import url_to_fs

    _, _, stamp = _stamp(path)
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
    captions file (`run`; `reltag plan` plans without one); check_captions reads it.
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
    if not fs.ls(p, detail=False):
        raise ValueError(f"image folder {images} is empty")
    oracle = "oracle" in captioner_names(cfg.caption)
    if captions is None:
        if oracle and run:
            raise ValueError("captioner 'oracle' needs a captions file (--captions, COCO-Captions JSON)")
        return
    fs, p = url_to_fs(captions)
    if not fs.exists(p):
        raise ValueError(f"captions file {captions} does not exist")
    if fs.isdir(p):
        raise ValueError(f"captions file {captions} is a folder, not a COCO-Captions JSON file")


def check_captions(captions: str | None, cfg: PipelineConfig, annotations: str) -> list[str]:
    """The human captions file read and validated as the caption stage will (broken JSON, a record without a
    caption or with a non-integer id: a ValueError naming the file and record), and compared with the
    annotation file's images: captions for none of them is an error (a wrong file would give 0 triplets and
    exit 0), for only some a warning line with the count (returned)."""
    if captions is None or "oracle" not in captioner_names(cfg.caption):
        return []
    from models.captioners.oracle import OracleCaptioner

    captioned = OracleCaptioner(captions).image_ids()
    ids = annotation_image_ids(annotations)
    n = len(ids)
    hit = len(ids & captioned)
    if n and not hit:
        eg_cap, eg_ann = sorted(captioned)[:3], sorted(ids)[:3]
        raise ValueError(
            f"captions file {captions} has captions for none of the {n} images of annotations file "
            f"{annotations} (caption image ids e.g. {eg_cap}, annotated image ids e.g. {eg_ann}); wrong file?"
        )
    if hit < n:
        return [
            f"warning: captions file {captions} has captions for {hit} of the {n} images of the annotations "
            f"file; the other {n - hit} get no captions and no triplets"
        ]
    return []


def annotation_image_ids(path: str) -> set[int]:
    """The `images[*].id` of a detection file, streamed; reading stops at the end of the `images` list (it comes
    first in COCO and Objects365 files). Records without an integer id are left to the planner to quarantine."""
    import fsspec
    import ijson

    ids: set[int] = set()
    with fsspec.open(path, "rb") as f:
        try:
            for prefix, event, value in ijson.parse(f):
                if prefix == "images.item.id" and isinstance(value, int) and not isinstance(value, bool):
                    ids.add(value)
                elif prefix == "images" and event == "end_array":
                    break
        except ijson.common.JSONError as e:
            raise ValueError(
                f"annotations file {path} is not valid JSON (while reading 'images'): {e}"
            ) from e
    return ids


class RunInputs(NamedTuple):
    """A run's context, its chain of stage keys and the input checksums they were computed from (each input
    file is read or looked up once)."""

    ctx: RunContext
    links: list[ChainLink]
    annotations_sha256: str
    annotations_bytes: int
    captions_sha256: str | None


def _check_dataset_name(dataset: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dataset):
        raise ValueError(
            f"dataset name {dataset!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
        )


def run_context(
    annotations: str, images: str, out: str, captions: str | None, dataset: str, cfg: PipelineConfig
) -> RunInputs:
    """The run's context (its keys, from the input checksums and the config) without planning anything."""
    _check_dataset_name(dataset)
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
    layout = ctx.layout
    plan = _ensure_plan(layout, annotations, images, dataset, cfg, ann_sha, ann_bytes)
    if not layout.fs.exists(layout.manifest):
        record = RunRecord(
            run_key=ctx.run_key,
            dataset=dataset,
            plan_key=ctx.plan_key,
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


def plan_only(
    annotations: str, images: str, out: str, dataset: str, cfg: PipelineConfig
) -> tuple[RunLayout, PlanManifest]:
    """The plan alone, for `reltag plan` without the captions file that names a human-caption run: the plan
    key needs only the plan settings and the annotation checksum. A later run with its captions reuses it."""
    _check_dataset_name(dataset)
    ann_sha, ann_bytes = cached_checksum(annotations, out)
    pkey = plan_key(cfg, {"annotations_sha256": ann_sha})
    layout = RunLayout(out, dataset, pkey, pkey, (), folders())
    return layout, _ensure_plan(layout, annotations, images, dataset, cfg, ann_sha, ann_bytes)


def _ensure_plan(layout, annotations, images, dataset, cfg, ann_sha, ann_bytes) -> PlanManifest:
    """The plan of the layout's plan folder, planned by this process unless it exists (or another is at it)."""
    plan = _planned_or_claim(layout)
    if plan is not None:
        return plan
    try:  # this process holds the plan's lease: plan, then release it
        t0 = time.perf_counter()
        outcome = plan_shards(annotations, layout, cfg.plan)
        plan = PlanManifest(
            plan_key=layout.plan_key,
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
    return plan


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
