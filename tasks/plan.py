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

from storage import schemas
from storage.atomic import ParquetBatchWriter, write_table
from storage.layout import RunLayout
from storage.records import Box, ImageRecord, Quarantined
from tasks.config import PlanConfig

#: One spilled annotation (fixed width, so a shard's annotations load with one np.fromfile).
ANN_DTYPE = np.dtype(
    [
        ("ann_id", "<i8"),
        ("image_pos", "<i8"),
        ("category_id", "<i8"),
        ("bbox", "<f8", (4,)),
        ("iscrowd", "<i1"),
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
        buf = np.zeros(CHUNK, dtype=ANN_DTYPE)
        n = 0
        for j, a in enumerate(_items(annotations, "annotations.item")):
            counts["annotations_in_file"] += 1
            row = _ann_row(a, j, quarantine)
            if row is None:
                continue
            buf[n] = row
            n += 1
            if n == CHUNK:
                _spill_anns(tmp, buf[:n], sorted_ids, order, cfg.shard_size, quarantine, counts)
                n = 0
        if n:
            _spill_anns(tmp, buf[:n], sorted_ids, order, cfg.shard_size, quarantine, counts)
        del buf
        # -- build each shard --------------------------------------------------------------------------------
        shards = []
        for s, img_file in enumerate(image_files):
            records = _build_shard(s, tmp, img_file, dup, cat_names, cfg, quarantine, counts)
            rows, nbytes = write_table(
                fs, layout.images(s), schemas.to_table(records, ImageRecord), schemas.IMAGES
            )
            shards.append(
                {
                    "shard": s,
                    "images": rows,
                    "boxes": sum(len(r.boxes) for r in records),
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


def _ann_row(a, j: int, q: _Quarantine):
    if not isinstance(a, dict):
        q.add(
            None,
            f"annotations[{j}]",
            "malformed_annotation",
            f"annotation #{j} is {type(a).__name__}, not an object",
        )
        return None
    aid, iid, cid, bbox = a.get("id"), a.get("image_id"), a.get("category_id"), a.get("bbox")
    rec = f"annotation {aid}"
    for name, v in (("id", aid), ("image_id", iid), ("category_id", cid)):
        if not isinstance(v, int) or isinstance(v, bool):
            q.add(
                iid if isinstance(iid, int) else None,
                rec,
                "malformed_annotation",
                f"annotation {aid!r} (#{j}) has {name} {v!r}, not an integer",
            )
            return None
    if (
        not isinstance(bbox, list | tuple)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        q.add(
            iid,
            rec,
            "malformed_bbox",
            f"bbox of annotation {aid} is {bbox!r:.100}; expected 4 finite numbers [x, y, w, h]",
        )
        return None
    crowd = a.get("iscrowd", 0)
    return (aid, iid, cid, tuple(float(v) for v in bbox), 1 if crowd else 0)


def _spill_anns(tmp, rows, sorted_ids, order, shard_size, q, counts):
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
) -> list[ImageRecord]:
    images = np.load(img_file, allow_pickle=True)
    ann_path = os.path.join(tmp, f"anns-{s:05d}.bin")
    anns = np.fromfile(ann_path, dtype=ANN_DTYPE) if os.path.exists(ann_path) else np.zeros(0, ANN_DTYPE)
    anns = anns[np.lexsort((anns["ann_id"], anns["image_pos"]))]
    base = s * cfg.shard_size
    by_pos: dict[int, list] = {}
    for a in anns:
        by_pos.setdefault(int(a["image_pos"]) - base, []).append(a)
    out = []
    for local, (iid, fname, width, height) in enumerate(images):
        if dup[base + local]:
            q.add(
                int(iid),
                f"image {iid}",
                "duplicate_image_id",
                f"image id {iid} appears more than once (file_name {fname!r}); the first occurrence is kept",
            )
            continue
        boxes = []
        for a in by_pos.get(local, ()):
            box = _check_box(a, int(iid), int(width), int(height), cat_names, cfg, q, counts)
            if box is not None:
                boxes.append(box)
        out.append(ImageRecord(int(iid), str(fname), int(width), int(height), s, boxes))
    return out


def _check_box(a, iid, width, height, cat_names, cfg, q, counts) -> Box | None:
    aid, cid = int(a["ann_id"]), int(a["category_id"])
    x, y, w, h = (float(v) for v in a["bbox"])
    if cid not in cat_names:
        q.add(
            iid,
            f"annotation {aid}",
            "unknown_category",
            f"annotation {aid} of image {iid} has category_id {cid}, not in 'categories'",
        )
        return None
    if a["iscrowd"]:
        counts["dropped_crowd"] += 1
        return None
    if w <= 0 or h <= 0:
        counts["dropped_zero_area"] += 1
        return None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        if cfg.box_policy == "quarantine" or x1 <= x0 or y1 <= y0:
            q.add(
                iid,
                f"annotation {aid}",
                "bbox_outside_image",
                f"bbox of annotation {aid} [{x}, {y}, {w}, {h}] leaves image {iid} of size {width}x{height}",
            )
            return None
        counts["clipped_boxes"] += 1
        x, y, w, h = x0, y0, x1 - x0, y1 - y0
    return Box(aid, cid, cat_names[cid], x, y, w, h)


def shard_records(layout: RunLayout, shard: int) -> list[ImageRecord]:
    """The planned images of one shard."""
    import pyarrow.parquet as pq

    with layout.fs.open(layout.images(shard), "rb") as f:
        return schemas.from_table(pq.read_table(f, schema=schemas.IMAGES), ImageRecord)
