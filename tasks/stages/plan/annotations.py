"""Plan stage, annotations: spilled per shard to local disk, checked for repeated ids, classes ordered."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from tasks.stages.plan.detections import _Quarantine, _values

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
#: Annotations per spill chunk (with one shard, what bounds the planner's peak memory).
CHUNK = 65536
#: Hash buckets for the duplicate annotation id check (ann_id % ID_BUCKETS), each checked alone.
ID_BUCKETS = 64
_ID_DTYPE = np.dtype([("ann_id", "<i8"), ("file_index", "<i8")])
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
