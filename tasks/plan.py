"""Plan stage: stream a COCO / Objects365 detection JSON in bounded memory, validate, cut into shards.

Memory: the JSON is read with ijson (C backend) three times (categories, images, annotations), never
loaded whole. Per image the planner keeps 16 bytes (id and position, for the annotation lookup);
annotations are spilled to per-shard files on local disk as they stream by, so peak RSS is bounded by
the spill chunk and one shard, not by the number of annotations.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import ijson
import numpy as np
import pyarrow as pa

from storage import schemas
from storage.atomic import ParquetBatchWriter, write_table
from storage.layout import RunLayout
from storage.records import ImageRecord, Quarantined
from tasks.config import PlanConfig

#: One spilled annotation (fixed width, so a shard's annotations load with one np.fromfile).
ANN_DTYPE = np.dtype(
    [
        ("ann_id", "<i8"),
        ("image_pos", "<i8"),
        ("category_id", "<i8"),
        ("bbox", "<f8", (4,)),
        ("iscrowd", "<i1"),
        ("file_index", "<i8"),  # position in the file's "annotations" list (the reference's box order)
    ]
)
CHUNK = 65536


def file_checksum(path: str, block: int = 8 << 20) -> tuple[str, int]:
    """sha256 hex digest and size in bytes of a local or fsspec file."""
    h = hashlib.sha256()
    n = 0
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _items(path: str, prefix: str) -> Iterator:
    with fsspec.open(path, "rb") as f:
        try:
            yield from ijson.items(f, prefix, use_float=True)
        except ijson.common.IncompleteJSONError as e:
            raise ValueError(
                f"annotations file {path} is not valid JSON (while reading '{prefix}'): {e}"
            ) from e


def safe_file_name(name: object) -> str | None:
    """Why `name` is not a safe relative image path, or None when it is."""
    if not isinstance(name, str) or not name.strip():
        return f"file_name {name!r} is not a non-empty string"
    if "\x00" in name:
        return f"file_name {name!r} contains a NUL byte"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "://" in name:
        return f"file_name {name!r} is absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return f"file_name {name!r} escapes the image root"
    return None


@dataclass
class PlanOutcome:
    """What planning produced: the shards (by index) and every count the manifest reports."""

    categories: list[dict]
    shards: list[dict]
    counts: Counter = field(default_factory=Counter)
    n_quarantined: int = 0


class _Quarantine:
    """Quarantine rows of the plan stage, flushed to one Parquet file as they accumulate."""

    def __init__(self, fs, path):
        self.rows: list[Quarantined] = []
        self.total = 0
        self.reasons: Counter = Counter()
        self._w = ParquetBatchWriter(fs, path, schemas.QUARANTINE).__enter__()

    def add(self, image_id, record, reason, detail):
        self.rows.append(Quarantined("plan", image_id, record, reason, detail))
        self.reasons[reason] += 1
        self.total += 1
        if len(self.rows) >= 10000:
            self.flush()

    def flush(self):
        if self.rows:
            self._w.write(schemas.to_table(self.rows, Quarantined))
            self.rows = []

    def close(self, exc=None):
        self.flush()
        self._w.__exit__(type(exc) if exc else None, exc, None)


def read_categories(path: str) -> list[dict]:
    """The `categories` list, validated: integer ids, unique, non-empty names."""
    cats = []
    seen = set()
    for c in _items(path, "categories.item"):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise ValueError(
                f"annotations file {path}: category {c!r:.200} needs an integer 'id' and a string 'name'"
            )
        if c["id"] in seen:
            raise ValueError(f"annotations file {path}: category id {c['id']} appears twice")
        seen.add(c["id"])
        cats.append({"id": c["id"], "name": c["name"]})
    if not cats:
        raise ValueError(f"annotations file {path} has no 'categories'")
    return sorted(cats, key=lambda c: c["id"])


def plan_shards(
    annotations: str, layout: RunLayout, cfg: PlanConfig, spill_dir: str | None = None
) -> PlanOutcome:
    """Stream the detection file into `images/shard-XXXXX.parquet` under `layout`, quarantining bad records.

    Rules (counted in the outcome): crowd boxes and boxes of zero or negative width/height are dropped, as the
    RLIPv2 reference does; a box that leaves the image is clipped (cfg.box_policy="clip") or quarantined;
    an annotation with an unknown category or image id, a malformed bbox, an image without width/height, a
    duplicate image id, or an unsafe file_name is quarantined with the reason.

    Boxes are stored in annotation-id order. Each image also records, for match.mode "reference", its boxes'
    positions in the file (`box_file_index`) and its classes in the order of their first annotation in the
    file, crowd, zero-area and left-empty-after-clipping annotations included (`class_order`: the order of
    the reference's `bboxes_names`, which it builds from every annotation of the image).
    """
    fs = layout.fs
    categories = read_categories(annotations)
    cat_names = {c["id"]: c["name"] for c in categories}
    tmp = tempfile.mkdtemp(prefix="reltag-plan-", dir=spill_dir)
    quarantine = _Quarantine(fs, layout.quarantine("plan"))
    counts: Counter = Counter()
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
                )
                continue
            w, h = im.get("width"), im.get("height")
            if not isinstance(w, int | float) or not isinstance(h, int | float) or w <= 0 or h <= 0:
                quarantine.add(
                    iid,
                    rec,
                    "missing_size",
                    f"image {iid} has width {w!r} and height {h!r}; both must be positive numbers",
                )
                continue
            why = safe_file_name(im.get("file_name"))
            if why:
                quarantine.add(iid, rec, "unsafe_file_name", f"image {iid}: {why}")
                continue
            ids.append(iid)
            images_spill.append((iid, im["file_name"], int(w), int(h)))
            if len(images_spill) == cfg.shard_size:
                image_files.append(_spill_images(tmp, len(image_files), images_spill))
                images_spill = []
        if images_spill:
            image_files.append(_spill_images(tmp, len(image_files), images_spill))
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
        if len(chunk):
            _spill_anns(tmp, chunk.to_array(quarantine), sorted_ids, order, cfg.shard_size, quarantine)
        # -- build each shard --------------------------------------------------------------------------------
        shards = []
        for s, img_file in enumerate(image_files):
            table = _build_shard(s, tmp, img_file, dup, cat_names, cfg, quarantine, counts)
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
        shutil.rmtree(tmp, ignore_errors=True)
    for reason, k in quarantine.reasons.items():
        counts[f"quarantined_{reason}"] = k
    return PlanOutcome(categories, shards, counts, quarantine.total)


def _spill_images(tmp: str, shard: int, rows: list) -> str:
    path = os.path.join(tmp, f"images-{shard:05d}.npy")
    np.save(path, np.array(rows, dtype=object), allow_pickle=True)
    return path


_NUM = (int, float)


class _AnnChunk:
    """Up to CHUNK annotations as columns; malformed records are quarantined as they arrive."""

    def __init__(self):
        self.ann_id, self.image_id, self.category_id, self.bbox, self.crowd, self.index = (
            [],
            [],
            [],
            [],
            [],
            [],
        )

    def __len__(self):
        return len(self.ann_id)

    def add(self, a, j: int, q: _Quarantine) -> None:
        # fast path: exact types checked with `type(...) is` (bool is not an int here)
        if type(a) is dict:
            aid, iid, cid, bb = a.get("id"), a.get("image_id"), a.get("category_id"), a.get("bbox")
            if (
                type(aid) is int
                and type(iid) is int
                and type(cid) is int
                and type(bb) is list
                and len(bb) == 4
                and type(bb[0]) in _NUM
                and type(bb[1]) in _NUM
                and type(bb[2]) in _NUM
                and type(bb[3]) in _NUM
            ):
                self.ann_id.append(aid)
                self.image_id.append(iid)
                self.category_id.append(cid)
                self.bbox.append(bb)
                self.crowd.append(1 if a.get("iscrowd", 0) else 0)
                self.index.append(j)
                return
        self._reject(a, j, q)

    @staticmethod
    def _reject(a, j: int, q: _Quarantine) -> None:
        if not isinstance(a, dict):
            q.add(
                None,
                f"annotations[{j}]",
                "malformed_annotation",
                f"annotation #{j} is {type(a).__name__}, not an object",
            )
            return
        aid, iid, bbox = a.get("id"), a.get("image_id"), a.get("bbox")
        for name in ("id", "image_id", "category_id"):
            v = a.get(name)
            if type(v) is not int:
                q.add(
                    iid if type(iid) is int else None,
                    f"annotation {aid}",
                    "malformed_annotation",
                    f"annotation {aid!r} (#{j}) has {name} {v!r}, not an integer",
                )
                return
        q.add(
            iid,
            f"annotation {aid}",
            "malformed_bbox",
            f"bbox of annotation {aid} is {bbox!r:.100}; expected 4 finite numbers [x, y, w, h]",
        )

    def to_array(self, q: _Quarantine) -> np.ndarray:
        rows = np.zeros(len(self), dtype=ANN_DTYPE)
        rows["ann_id"] = self.ann_id
        rows["image_pos"] = self.image_id  # holds the image id until _spill_anns looks its position up
        rows["category_id"] = self.category_id
        rows["bbox"] = np.asarray(self.bbox, dtype=np.float64).reshape(-1, 4)
        rows["iscrowd"] = self.crowd
        rows["file_index"] = self.index
        finite = np.isfinite(rows["bbox"]).all(axis=1)
        for r in rows[~finite]:
            q.add(
                int(r["image_pos"]),
                f"annotation {int(r['ann_id'])}",
                "malformed_bbox",
                f"bbox of annotation {int(r['ann_id'])} is {r['bbox'].tolist()}; expected 4 finite numbers [x, y, w, h]",
            )
        return rows[finite]


def _spill_anns(tmp, rows, sorted_ids, order, shard_size, q):
    # image_pos holds the image id on the way in; look the ids up in one vectorised search
    iid = rows["image_pos"].copy()
    k = np.searchsorted(sorted_ids, iid)
    k = np.minimum(k, max(len(sorted_ids) - 1, 0))
    known = (len(sorted_ids) > 0) & (sorted_ids[k] == iid) if len(sorted_ids) else np.zeros(len(iid), bool)
    for r in rows[~known]:
        q.add(
            int(r["image_pos"]),
            f"annotation {int(r['ann_id'])}",
            "unknown_image_id",
            f"annotation {int(r['ann_id'])} refers to image {int(r['image_pos'])}, which is not a planned image",
        )
    rows = rows[known].copy()
    rows["image_pos"] = order[k[known]]  # first occurrence of the id in file order
    shard = rows["image_pos"] // shard_size
    for s in np.unique(shard):
        with open(os.path.join(tmp, f"anns-{int(s):05d}.bin"), "ab") as f:
            rows[shard == s].tofile(f)


def _build_shard(
    s, tmp, img_file, dup, cat_names, cfg: PlanConfig, q: _Quarantine, counts: Counter
) -> pa.Table:
    """Validate the shard's boxes (vectorised) and return its images table."""
    images = np.load(img_file, allow_pickle=True)
    ann_path = os.path.join(tmp, f"anns-{s:05d}.bin")
    anns = np.fromfile(ann_path, dtype=ANN_DTYPE) if os.path.exists(ann_path) else np.zeros(0, ANN_DTYPE)
    anns = anns[np.lexsort((anns["ann_id"], anns["image_pos"]))]
    base = s * cfg.shard_size
    local = anns["image_pos"] - base
    widths = np.array([im[2] for im in images], dtype=np.float64) if len(images) else np.zeros(0)
    heights = np.array([im[3] for im in images], dtype=np.float64) if len(images) else np.zeros(0)
    image_ids = np.array([im[0] for im in images], dtype=np.int64)
    keep = np.ones(len(anns), dtype=bool)
    # unknown category -> quarantine
    known = np.isin(anns["category_id"], np.fromiter(cat_names, dtype=np.int64, count=len(cat_names)))
    for a in anns[~known]:
        aid, iid = int(a["ann_id"]), int(image_ids[int(a["image_pos"]) - base])
        q.add(
            iid,
            f"annotation {aid}",
            "unknown_category",
            f"annotation {aid} of image {iid} has category_id {int(a['category_id'])}, not in 'categories'",
        )
    keep &= known
    # crowd and zero/negative size -> dropped and counted, as the reference does
    crowd = keep & (anns["iscrowd"] != 0)
    counts["dropped_crowd"] += int(crowd.sum())
    keep &= ~crowd
    x, y, w, h = (anns["bbox"][:, k] for k in range(4))
    empty = keep & ((w <= 0) | (h <= 0))
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
    # duplicate image ids: every occurrence after the first is quarantined (its boxes went to the first)
    keep_img = ~dup[base : base + len(images)]
    for li in np.flatnonzero(~keep_img):
        iid = int(image_ids[li])
        q.add(
            iid,
            f"image {iid}",
            "duplicate_image_id",
            f"image id {iid} appears more than once (file_name {images[li][1]!r}); the first occurrence is kept",
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


def _class_order(anns: np.ndarray, local: np.ndarray, known: np.ndarray, img_sel: np.ndarray) -> pa.ListArray:
    """Per kept image, its category ids in order of their first annotation in the file.

    Every annotation of a known category counts, dropped ones too (crowd, zero-area, empty after clipping,
    quarantined for leaving the image): the reference's `bboxes_names` is built from all of them.
    """
    k = np.flatnonzero(known)
    li, cat, pos = local[k], anns["category_id"][k], anns["file_index"][k]
    o = np.lexsort((pos, cat, li))  # runs of (image, category), each run in file order
    li, cat, pos = li[o], cat[o], pos[o]
    first = np.ones(len(o), dtype=bool)
    first[1:] = (li[1:] != li[:-1]) | (cat[1:] != cat[:-1])
    li, cat, pos = li[first], cat[first], pos[first]
    o = np.lexsort((pos, li))  # per image, by the first annotation's position
    li, cat = li[o], cat[o]
    starts = np.searchsorted(li, img_sel, side="left")
    ends = np.searchsorted(li, img_sel, side="right")
    take = (
        np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        if len(img_sel)
        else np.zeros(0, np.int64)
    ).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(cat[take].astype(np.int32), pa.int32())
    )


def shard_records(layout: RunLayout, shard: int) -> list[ImageRecord]:
    """The planned images of one shard."""
    import pyarrow.parquet as pq

    with layout.fs.open(layout.images(shard), "rb") as f:
        return schemas.from_table(pq.read_table(f, schema=schemas.IMAGES), ImageRecord)
