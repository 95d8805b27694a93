"""Plan stage: stream a COCO / Objects365 detection JSON in bounded memory, validate, cut into shards.

Memory: the JSON is read with ijson (C backend) three times (categories, images, annotations), never
loaded whole. Per image the planner keeps 16 bytes (id and position, for the annotation lookup);
annotations are spilled to per-shard files on local disk as they stream by, so peak RSS is bounded by
the spill chunk and one shard, not by the number of annotations. Annotation ids are checked for
duplicates through hash buckets on disk (one bucket in memory at a time).

Python's json module writes NaN / Infinity / -Infinity for non-finite floats; those files are not JSON, but
they exist, so the reader turns such bare tokens into strings (outside string literals only) and the record
holding one is quarantined (bad_bbox, missing_size, ...) instead of the whole file failing.

Images are checked cheaply per shard, in a thread pool (tasks.images.check_header): the name is safe, the
file exists inside the image root (symlinks resolved), its header decodes, its pixel count is within
`max_pixels` and its stored size equals the annotated width/height (or its boxes are rescaled). The pixels
themselves are decoded later, by the verify stage (tasks/stages/verify.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from tasks.images import BadImage, check_header, unsafe_name

#: One spilled annotation (fixed width, so a shard's annotations load with one np.fromfile).
ANN_DTYPE = np.dtype(
    [
        ("ann_id", "<i8"),
        ("image_pos", "<i8"),
        ("category_id", "<i8"),
        ("bbox", "<f8", (4,)),
        ("iscrowd", "<i1"),
        ("ignore", "<i1"),  # Objects365's `ignore: 1` boxes: dropped like crowd boxes, counted apart
        ("file_index", "<i8"),  # position in the file's "annotations" list (the reference's box order)
    ]
)
CHUNK = 65536
#: Hash buckets for the duplicate annotation id check (ann_id % ID_BUCKETS), each checked alone.
ID_BUCKETS = 64
_ID_DTYPE = np.dtype([("ann_id", "<i8"), ("file_index", "<i8")])


def file_checksum(path: str, block: int = 8 << 20) -> tuple[str, int]:
    """sha256 hex digest and size in bytes of a local or fsspec file."""
    h = hashlib.sha256()
    n = 0
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class _NonFinite:
    """A binary file wrapper that quotes the bare tokens NaN, Infinity and -Infinity outside JSON strings.

    Python's json.dump writes them for non-finite floats; yajl (ijson's C backend) rejects them. Quoted, they
    reach the record checks as strings and the record is quarantined with its values. String state is tracked
    across reads (escapes included); a chunk without backslashes or tokens costs one count of its quotes.
    """

    _TOKEN = re.compile(rb'"|-?Infinity|NaN')
    _BODY = re.compile(rb'(?s)(?:[^"\\]|\\.)*')  # string body up to its closing quote (escapes consumed)
    _HOLD = 9  # len(b"-Infinity"): bytes held back so that no token is cut between two reads

    def __init__(self, f, block: int = 1 << 16):
        self._f, self._block = f, block
        self._in_str, self._carry, self._eof = False, b"", False
        self.pos = 0  # input bytes consumed, for error messages

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson reads 0 bytes to learn whether the file is binary
            return b""
        while True:
            if self._eof and not self._carry:
                return b""
            raw = b"" if self._eof else self._f.read(max(n, self._block) if n and n > 0 else self._block)
            self.pos += len(raw)
            if not raw:
                self._eof = True
            buf = self._carry + raw
            limit = len(buf) if self._eof else max(0, len(buf) - self._HOLD)
            out, done = self._scan(buf, limit)
            self._carry = buf[done:]
            if self._eof and self._carry and done == 0:  # a dangling backslash at the very end: pass it on
                out, self._carry = out + self._carry, b""
            if out or (self._eof and not self._carry):
                return out

    def _scan(self, buf: bytes, limit: int) -> tuple[bytes, int]:
        if b"\\" not in buf and b"NaN" not in buf and b"Infinity" not in buf:
            if buf.count(b'"', 0, limit) % 2:
                self._in_str = not self._in_str
            return buf[:limit], limit
        parts, start, pos = [], 0, 0
        while pos < limit:
            if self._in_str:
                pos = self._BODY.match(buf, pos).end()
                if pos >= len(buf) or buf[pos] != 0x22:  # ran out inside the string (or on a final backslash)
                    break
                self._in_str, pos = False, pos + 1
                continue
            m = self._TOKEN.search(buf, pos)
            if m is None or m.start() >= limit:
                pos = limit
                break
            if m.group() == b'"':
                self._in_str, pos = True, m.end()
            else:
                parts += [buf[start : m.start()], b'"', m.group(), b'"']
                start = pos = m.end()
        parts.append(buf[start:pos])
        return b"".join(parts), pos


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _items(path: str, prefix: str) -> Iterator:
    with fsspec.open(path, "rb") as f:
        src = _NonFinite(f)
        try:
            yield from ijson.items(src, prefix, use_float=True)
        except ijson.common.JSONError as e:
            raise ValueError(
                f"annotations file {path} is not valid JSON (while reading '{prefix}', near byte {src.pos}): "
                f"{_first_line(e)}"
            ) from e


def check_top_level(path: str) -> None:
    """A detection file is one JSON object: refuse an empty file, a list, or anything else, in one line."""
    with fsspec.open(path, "rb") as f:
        head = f.read(4096)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise ValueError(
            f"annotations file {path} is empty (expected a COCO / Objects365 detection JSON object)"
        )
    if text[:1] != b"{":
        what = {b"[": "a JSON list", b'"': "a JSON string"}.get(
            text[:1], f"not JSON (starts with {text[:16]!r})"
        )
        raise ValueError(
            f"annotations file {path} is {what}, not an object with 'images', 'annotations' and 'categories'"
        )


def safe_file_name(name: object) -> str | None:
    """Why `name` is not a safe relative image path, or None when it is (tasks.images.unsafe_name)."""
    return unsafe_name(name)


def _values(obj) -> str | None:
    """A record's values as JSON for its quarantine row (at most 2000 characters)."""
    try:
        text = json.dumps(obj, default=repr)
    except (TypeError, ValueError):
        text = json.dumps(repr(obj))
    return text if len(text) <= 2000 else text[:1997] + "..."


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

    def add(self, image_id, record, reason, detail, values=None):
        self.rows.append(Quarantined("plan", image_id, record, reason, detail, values))
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
    check_top_level(path)
    found = list(_items(path, "categories"))
    if not found:
        raise ValueError(
            f"annotations file {path} has no 'categories' key (not a COCO / Objects365 detection file?)"
        )
    if not isinstance(found[0], list):
        raise ValueError(f"annotations file {path}: 'categories' is a {type(found[0]).__name__}, not a list")
    cats = []
    seen = set()
    for c in found[0]:
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
            why = safe_file_name(im.get("file_name"))
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


_NUM = (int, float)


class _AnnChunk:
    """Up to CHUNK annotations as columns; malformed records are quarantined as they arrive."""

    def __init__(self):
        self.ann_id, self.image_id, self.category_id, self.bbox, self.crowd, self.ignore, self.index = (
            [], [], [], [], [], [], [],
        )  # fmt: skip

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
                self.ignore.append(1 if a.get("ignore", 0) else 0)
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
                _values(a),
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
                    _values(a),
                )
                return
        q.add(
            iid,
            f"annotation {aid}",
            "bad_bbox",
            f"bbox of annotation {aid} is {bbox!r:.100}; expected 4 finite numbers [x, y, w, h]",
            _values(a),
        )

    def to_array(self, q: _Quarantine) -> np.ndarray:
        rows = np.zeros(len(self), dtype=ANN_DTYPE)
        rows["ann_id"] = self.ann_id
        rows["image_pos"] = self.image_id  # holds the image id until _spill_anns looks its position up
        rows["category_id"] = self.category_id
        with np.errstate(
            over="ignore"
        ):  # a number beyond float64 (1e400 cannot come from JSON; 1e308 * 10 can't)
            rows["bbox"] = np.asarray(self.bbox, dtype=np.float64).reshape(-1, 4)
        rows["iscrowd"] = self.crowd
        rows["ignore"] = self.ignore
        rows["file_index"] = self.index
        finite = np.isfinite(rows["bbox"]).all(axis=1)
        for r in rows[~finite]:
            q.add(
                int(r["image_pos"]),
                f"annotation {int(r['ann_id'])}",
                "bad_bbox",
                f"bbox of annotation {int(r['ann_id'])} is {r['bbox'].tolist()}; expected 4 finite numbers [x, y, w, h]",
                _ann_values(r, int(r["image_pos"])),
            )
        return rows[finite]


def _ann_values(r, image_id: int) -> str:
    """An annotation's values as read (the fields the planner keeps), for its quarantine row."""
    return _values(
        {
            "id": int(r["ann_id"]),
            "image_id": image_id,
            "category_id": int(r["category_id"]),
            "bbox": [float(v) for v in r["bbox"]],
            "iscrowd": int(r["iscrowd"]),
            "ignore": int(r["ignore"]),
            "index": int(r["file_index"]),
        }
    )


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
            _ann_values(r, int(r["image_pos"])),
        )
    rows = rows[known].copy()
    rows["image_pos"] = order[k[known]]  # first occurrence of the id in file order
    shard = rows["image_pos"] // shard_size
    for s in np.unique(shard):
        with open(os.path.join(tmp, f"anns-{int(s):05d}.bin"), "ab") as f:
            rows[shard == s].tofile(f)
    # the ids again, by hash bucket, for the duplicate check (a bucket at a time fits in memory)
    ids = np.zeros(len(rows), dtype=_ID_DTYPE)
    ids["ann_id"], ids["file_index"] = rows["ann_id"], rows["file_index"]
    bucket = rows["ann_id"] % ID_BUCKETS
    for b in np.unique(bucket):
        with open(os.path.join(tmp, f"ids-{int(b):03d}.bin"), "ab") as f:
            ids[bucket == b].tofile(f)


def _duplicate_ann_ids(tmp: str) -> dict[int, int]:
    """{file position of a repeated annotation id: file position of its first use} over the whole file."""
    dups: dict[int, int] = {}
    for b in range(ID_BUCKETS):
        path = os.path.join(tmp, f"ids-{b:03d}.bin")
        if not os.path.exists(path):
            continue
        ids = np.fromfile(path, dtype=_ID_DTYPE)
        ids = ids[np.lexsort((ids["file_index"], ids["ann_id"]))]
        again = np.flatnonzero(ids["ann_id"][1:] == ids["ann_id"][:-1]) + 1
        if len(again):
            starts = np.searchsorted(ids["ann_id"], ids["ann_id"][again], side="left")
            dups.update(zip(ids["file_index"][again].tolist(), ids["file_index"][starts].tolist()))
        os.remove(path)
    return dups


class _Checks:
    """Header checks of one shard's images, run in the plan's thread pool."""

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
