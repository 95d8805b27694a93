"""Plan stage: cut a detection JSON into shards of checked images and boxes (images/shard-XXXXX.parquet)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from storage import schemas
from storage.atomic import write_table
from storage.layout import RunLayout
from tasks.config import PlanConfig
from tasks.images import BadImage, check_header, unsafe_name
from tasks.stages.plan.annotations import (
    ANN_DTYPE,
    CHUNK,
    _ann_values,
    _AnnChunk,
    _class_order,
    _duplicate_ann_ids,
    _spill_anns,
)
from tasks.stages.plan.detections import _items, _Quarantine, _values, read_categories


@dataclass
class PlanOutcome:
    """What planning produced: the shards (by index) and every count the manifest reports."""

    categories: list[dict]
    shards: list[dict]
    counts: Counter = field(default_factory=Counter)
    n_quarantined: int = 0


def plan_shards(
    annotations: str,
    layout: RunLayout,
    cfg: PlanConfig,
    spill_dir: str | None = None,
    images_root: str | None = None,
) -> PlanOutcome:
    """Stream the detection file into `images/shard-XXXXX.parquet` under `layout`, quarantining bad records.

    Rules (counted in the outcome): crowd boxes, `ignore: 1` boxes and boxes of zero width or height are
    dropped, as the RLIPv2 reference does; a box that leaves the image is clipped (cfg.box_policy="clip") or
    quarantined; an annotation with an unknown category or image id, a bbox that is not 4 finite numbers or
    has a negative width or height (bad_bbox), an id used before (duplicate_annotation_id), an image without
    width/height, a duplicate image id, or an unsafe file_name is quarantined with the reason and its values.
    With `images_root`, every image is checked cheaply (header only, cfg.image_threads threads): missing,
    outside the root, undecodable header, too many pixels, or a stored size other than the annotated one are
    quarantined (or, for the size, its boxes rescaled when cfg.size_mismatch="rescale").

    Boxes are stored in annotation-id order. Each image also records, for match.mode "reference", its boxes'
    positions in the file (`box_file_index`) and its classes in the order of their first annotation in the
    file, crowd, zero-area and left-empty-after-clipping annotations included (`class_order`: the order of
    the reference's `bboxes_names`, which it builds from every annotation of the image).

    A file that is not a detection file (not an object, no categories, no images, no annotations, not JSON)
    raises ValueError naming the file and the problem.

    Memory: the JSON is read with ijson (C backend) three times (categories, images, annotations), never
    loaded whole. Per image the planner keeps 16 bytes (id and position, for the annotation lookup);
    annotations are spilled to per-shard files on local disk as they stream by, so peak RSS is bounded by
    the spill chunk and one shard, not by the number of annotations. Annotation ids are checked for
    duplicates through hash buckets on disk (one bucket in memory at a time).
    """
    fs = layout.fs
    categories = read_categories(annotations)
    cat_names = {c["id"]: c["name"] for c in categories}
    tmp = tempfile.mkdtemp(prefix="reltag-plan-", dir=spill_dir)
    quarantine = _Quarantine(fs, layout.quarantine("plan"))
    counts: Counter = Counter()
    pool = (
        ThreadPoolExecutor(cfg.header_threads(images_root), "reltag-header")
        if images_root is not None
        else None
    )
    try:
        # -- pass 1: images, in file order; shard = position // shard_size ----------------------------------
        ids = []
        images_spill = []  # per shard: list of (image_id, file_name, width, height); flushed per shard
        image_files = []
        for i, im in enumerate(_items(annotations, "images.item")):
            counts["images_in_file"] += 1
            if not isinstance(im, dict):
                quarantine.add(
                    None,
                    f"images[{i}]",
                    "malformed_image",
                    f"image record #{i} is {type(im).__name__}, not an object",
                    _values(im),
                )
                continue
            iid = im.get("id")
            rec = f"image {iid}"
            if not isinstance(iid, int) or isinstance(iid, bool):
                quarantine.add(
                    None,
                    f"images[{i}]",
                    "malformed_image",
                    f"image record #{i} has id {iid!r}, not an integer",
                    _values(im),
                )
                continue
            w, h = im.get("width"), im.get("height")
            if (
                not isinstance(w, int | float)
                or not isinstance(h, int | float)
                or isinstance(w, bool)
                or isinstance(h, bool)
                or not (0 < w < 2**31 and 0 < h < 2**31)
            ):
                quarantine.add(
                    iid,
                    rec,
                    "missing_size",
                    f"image {iid} has width {w!r} and height {h!r}; both must be positive numbers",
                    _values(im),
                )
                continue
            why = unsafe_name(im.get("file_name"))
            if why:
                quarantine.add(iid, rec, "unsafe_file_name", f"image {iid}: {why}", _values(im))
                continue
            ids.append(iid)
            images_spill.append((iid, im["file_name"], int(w), int(h)))
            if len(images_spill) == cfg.shard_size:
                image_files.append(_spill_images(tmp, len(image_files), images_spill))
                images_spill = []
        if images_spill:
            image_files.append(_spill_images(tmp, len(image_files), images_spill))
        if not counts["images_in_file"]:
            raise ValueError(
                f"annotations file {annotations} has no images ('images' is missing, empty or not a list)"
            )
        id_arr = np.asarray(ids, dtype=np.int64)
        del ids
        order = np.argsort(id_arr, kind="stable")
        sorted_ids = id_arr[order]
        dup = np.zeros(len(id_arr), dtype=bool)
        if len(sorted_ids):
            same = sorted_ids[1:] == sorted_ids[:-1]
            dup[order[1:][same]] = True  # every occurrence after the first (stable sort keeps file order)
        # -- pass 2: annotations, spilled per shard ----------------------------------------------------------
        chunk = _AnnChunk()
        j = -1
        for j, a in enumerate(_items(annotations, "annotations.item")):
            chunk.add(a, j, quarantine)
            if len(chunk) == CHUNK:
                _spill_anns(tmp, chunk.to_array(quarantine), sorted_ids, order, cfg.shard_size, quarantine)
                chunk = _AnnChunk()
        counts["annotations_in_file"] = j + 1
        if not counts["annotations_in_file"]:
            raise ValueError(
                f"annotations file {annotations} has no annotations ('annotations' is missing, empty or not a list)"
            )
        if len(chunk):
            _spill_anns(tmp, chunk.to_array(quarantine), sorted_ids, order, cfg.shard_size, quarantine)
        dup_anns = _duplicate_ann_ids(tmp)
        # -- build each shard --------------------------------------------------------------------------------
        shards = []
        for s, img_file in enumerate(image_files):
            checks = _Checks(images_root, cfg, pool) if pool is not None else None
            table = _build_shard(s, tmp, img_file, dup, cat_names, cfg, quarantine, counts, dup_anns, checks)
            rows, nbytes = write_table(fs, layout.images(s), table, schemas.IMAGES)
            shards.append(
                {
                    "shard": s,
                    "images": rows,
                    "boxes": len(table.column("boxes").combine_chunks().flatten()),
                    "batches": max(1, math.ceil(rows / cfg.batch_size)),
                    "bytes": nbytes,
                }
            )
        counts["images_planned"] = sum(x["images"] for x in shards)
        counts["boxes_planned"] = sum(x["boxes"] for x in shards)
        quarantine.close()
    except BaseException as e:
        quarantine.close(e)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    for reason, k in quarantine.reasons.items():
        counts[f"quarantined_{reason}"] = k
    return PlanOutcome(categories, shards, counts, quarantine.total)


def _spill_images(tmp: str, shard: int, rows: list) -> str:
    path = os.path.join(tmp, f"images-{shard:05d}.json")  # JSON, not pickle: nothing here unpickles
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


class _Checks:
    """Header checks of one shard's images, run in the plan's thread pool (tasks.images.check_header).

    The name is safe, the file exists inside the image root (symlinks resolved), its header decodes, its pixel
    count is within `max_pixels` and its stored size equals the annotated width/height (or its boxes are
    rescaled). The pixels themselves are decoded later, by the verify stage (tasks/stages/verify.py).
    """

    def __init__(self, images_root: str, cfg: PlanConfig, pool: ThreadPoolExecutor):
        self.root, self.cfg, self.pool = images_root, cfg, pool

    def _one(self, name: str):
        try:
            return check_header(self.root, name, self.cfg.max_pixels)
        except BadImage as e:
            return e

    def run(self, names: list[str]) -> list:
        return list(self.pool.map(self._one, names))


def _build_shard(
    s, tmp, img_file, dup, cat_names, cfg: PlanConfig, q: _Quarantine, counts: Counter,
    dup_anns: dict[int, int] | None = None, checks: _Checks | None = None,
) -> pa.Table:  # fmt: skip
    """Validate the shard's images (header checks) and boxes (vectorised) and return its images table."""
    with open(img_file) as f:
        images = json.load(f)
    ann_path = os.path.join(tmp, f"anns-{s:05d}.bin")
    anns = np.fromfile(ann_path, dtype=ANN_DTYPE) if os.path.exists(ann_path) else np.zeros(0, ANN_DTYPE)
    anns = anns[np.lexsort((anns["ann_id"], anns["image_pos"]))]
    base = s * cfg.shard_size
    local = anns["image_pos"] - base
    widths = np.array([im[2] for im in images], dtype=np.float64) if len(images) else np.zeros(0)
    heights = np.array([im[3] for im in images], dtype=np.float64) if len(images) else np.zeros(0)
    image_ids = np.array([im[0] for im in images], dtype=np.int64)

    def image_values(li: int) -> str:
        iid, name, w, h = images[li]
        return _values({"id": int(iid), "file_name": str(name), "width": int(w), "height": int(h)})

    # duplicate image ids: every occurrence after the first is quarantined (its boxes went to the first)
    keep_img = ~dup[base : base + len(images)]
    for li in np.flatnonzero(~keep_img):
        iid = int(image_ids[li])
        q.add(
            iid,
            f"image {iid}",
            "duplicate_image_id",
            f"image id {iid} appears more than once (file_name {images[li][1]!r}); the first occurrence is kept",
            image_values(li),
        )
    # header checks: the file is there, inside the root, decodes, is not too large, has the annotated size
    if checks is not None:
        todo = np.flatnonzero(keep_img)
        counts["images_header_checked"] += len(todo)
        for li, res in zip(todo, checks.run([str(images[li][1]) for li in todo])):
            iid, name = int(image_ids[li]), str(images[li][1])
            if isinstance(res, BadImage):
                q.add(iid, name, res.reason, f"{name}: {res.detail}", image_values(li))
                keep_img[li] = False
                continue
            if (res.width, res.height) == (widths[li], heights[li]):
                continue
            if cfg.size_mismatch == "quarantine":
                q.add(
                    iid, name, "size_mismatch",
                    f"{name}: stored size {res.width}x{res.height} != annotated {int(widths[li])}x{int(heights[li])}",
                    image_values(li),
                )  # fmt: skip
                keep_img[li] = False
                continue
            # rescale: boxes (annotated on a width x height grid) onto the stored grid
            sx, sy = res.width / widths[li], res.height / heights[li]
            mine = local == li
            anns["bbox"][mine] *= np.array([sx, sy, sx, sy])
            widths[li], heights[li] = res.width, res.height
            counts["rescaled_images"] += 1
    on_kept = keep_img[local] if len(anns) else np.zeros(0, bool)
    counts["boxes_of_quarantined_images"] += int((~on_kept).sum())
    keep = on_kept.copy()
    # unknown category -> quarantine
    known = np.isin(anns["category_id"], np.fromiter(cat_names, dtype=np.int64, count=len(cat_names)))
    for k in np.flatnonzero(keep & ~known):
        a = anns[k]
        aid, iid = int(a["ann_id"]), int(image_ids[int(a["image_pos"]) - base])
        q.add(
            iid,
            f"annotation {aid}",
            "unknown_category",
            f"annotation {aid} of image {iid} has category_id {int(a['category_id'])}, not in 'categories'",
            _ann_values(a, iid),
        )
    keep &= known
    # an annotation id used before (anywhere in the file) -> quarantine; the first use is kept
    if dup_anns:
        again = keep & np.isin(anns["file_index"], np.fromiter(dup_anns, dtype=np.int64, count=len(dup_anns)))
        for k in np.flatnonzero(again):
            a = anns[k]
            aid, iid, fi = int(a["ann_id"]), int(image_ids[local[k]]), int(a["file_index"])
            q.add(
                iid,
                f"annotation {aid}",
                "duplicate_annotation_id",
                f"annotation id {aid} at annotations[{fi}] (image {iid}) was used before at "
                f"annotations[{dup_anns[fi]}]; the first use is kept",
                _ann_values(a, iid),
            )
        keep &= ~again
    # crowd and ignore boxes -> dropped and counted, as the reference does
    crowd = keep & (anns["iscrowd"] != 0)
    counts["dropped_crowd"] += int(crowd.sum())
    keep &= ~crowd
    ignore = keep & (anns["ignore"] != 0)
    counts["dropped_ignore"] += int(ignore.sum())
    keep &= ~ignore
    x, y, w, h = (anns["bbox"][:, k] for k in range(4))
    # negative width or height -> quarantined (not a box); zero -> dropped and counted, as the reference does
    negative = keep & ((w < 0) | (h < 0))
    for k in np.flatnonzero(negative):
        a = anns[k]
        aid, iid = int(a["ann_id"]), int(image_ids[local[k]])
        q.add(
            iid,
            f"annotation {aid}",
            "bad_bbox",
            f"bbox of annotation {aid} is {a['bbox'].tolist()}: width and height must not be negative",
            _ann_values(a, iid),
        )
    keep &= ~negative
    empty = keep & ((w == 0) | (h == 0))
    counts["dropped_zero_area"] += int(empty.sum())
    keep &= ~empty
    # boxes leaving the image -> clipped, or quarantined (policy, or nothing left after clipping)
    W, H = widths[local], heights[local]
    x0, y0 = np.maximum(x, 0.0), np.maximum(y, 0.0)
    x1, y1 = np.minimum(x + w, W), np.minimum(y + h, H)
    outside = keep & ((x0 != x) | (y0 != y) | (x1 != x + w) | (y1 != y + h))
    lost = outside & ((x1 <= x0) | (y1 <= y0) | (cfg.box_policy == "quarantine"))
    for k in np.flatnonzero(lost):
        aid, iid, li = int(anns["ann_id"][k]), int(image_ids[local[k]]), int(local[k])
        q.add(
            iid,
            f"annotation {aid}",
            "bbox_outside_image",
            f"bbox of annotation {aid} {anns['bbox'][k].tolist()} leaves image {iid} of size "
            f"{int(widths[li])}x{int(heights[li])}",
            _ann_values(anns[k], iid),
        )
    keep &= ~lost
    clipped = outside & ~lost
    counts["clipped_boxes"] += int(clipped.sum())
    x, y, w, h = (
        np.where(clipped, x0, x),
        np.where(clipped, y0, y),
        np.where(clipped, x1 - x0, w),
        np.where(clipped, y1 - y0, h),
    )
    img_sel = np.flatnonzero(keep_img)
    class_order = _class_order(anns, local, known, img_sel)
    # columnar build: boxes of kept images as list<struct>, offsets from the sorted image positions
    sel = np.flatnonzero(keep)
    kept_local = local[sel]
    # kept_local is sorted: the boxes of image li are the run kept_local == li
    starts = np.searchsorted(kept_local, img_sel, side="left")
    ends = np.searchsorted(kept_local, img_sel, side="right")
    take = (
        np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        if len(img_sel)
        else np.zeros(0, np.int64)
    )
    take = take.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int32)
    idx = sel[take]
    labels = pa.array([cat_names[int(c)] for c in anns["category_id"][idx]], pa.string())
    struct = pa.StructArray.from_arrays(
        [
            pa.array(anns["ann_id"][idx], pa.int64()),
            pa.array(anns["category_id"][idx].astype(np.int32), pa.int32()),
            labels,
            pa.array(x[idx].astype(np.float32)),
            pa.array(y[idx].astype(np.float32)),
            pa.array(w[idx].astype(np.float32)),
            pa.array(h[idx].astype(np.float32)),
        ],
        fields=list(schemas.IMAGES.field("boxes").type.value_type),
    )
    return pa.Table.from_arrays(
        [
            pa.array(image_ids[img_sel], pa.int64()),
            pa.array([str(images[li][1]) for li in img_sel], pa.string()),
            pa.array(widths[img_sel].astype(np.int32), pa.int32()),
            pa.array(heights[img_sel].astype(np.int32), pa.int32()),
            pa.array(np.full(len(img_sel), s, dtype=np.int32), pa.int32()),
            pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct),
            pa.ListArray.from_arrays(
                pa.array(offsets, pa.int32()), pa.array(anns["file_index"][idx], pa.int64())
            ),
            class_order,
        ],
        schema=schemas.IMAGES,
    )
