"""Streaming reader of relation triplets for pre-training: finished reltag runs and VG-format JSON, per image.

What it does, in the reference loader's order (RLIPv2 `datasets/mixed_dataset.py: MixedRelDetection`):
  1. keep a relation when its confidence >= eta (inclusive); the confidence is the rule's value re-computed from
     the stored factors (storage.rules.confidence: `relation_only`: p_relation, the reference code; `paper`:
     p_subject * p_object * p_relation); a row without a confidence (human-labelled VG) is kept;
  2. optionally (`overlap_filter`) keep only pairs whose boxes overlap (storage.rules.boxes_overlap, on the
     unclamped boxes; not applied to VG files, as in the reference);
  3. drop images with no relation left.
The per-image steps that follow (the first 100 relations, clamping, texts, multi-hot pairs) belong to the
consumer (`models.rlipv2.data`); this module yields every surviving relation of an image in file order.
VG files are read record by record by storage.relations.vg (the one VG reader: checks and the same rules).

Reading streams one Parquet row group at a time, reads only the columns it needs, and skips row groups whose
statistics exclude them (max p_relation < eta, or image ids outside the wanted range): the whole dataset is
never in memory. An index pass (image ids and the confidence columns only) fixes the kept images' order, so
`iter_range(start, stop)` gives any contiguous slice: ranks and DataLoader workers take disjoint slices.
A run that is not finished (its ledger lacks a shard's write marker, or its statistics are missing) is refused.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.relations.records import ImageRelations, RelBox, RelRow
from storage.relations.sources import RunNotFinished, RunSource, Source, VGSource, resolve_source
from storage.relations.vg import iter_vg_records, vg_image
from storage.rules import boxes_overlap, check_eta, check_rule, confidences, passing_mask, rule_columns


def _check_settings(eta: float, rule: str) -> None:
    check_rule(rule)
    check_eta(eta)


# ---------------------------------------------------------------------------------------------------- the reader


@dataclass
class _Unit:
    """One file of one source; keys: the kept images in file order (image ids of a triplet file, item ordinals
    of a VG file)."""

    source: int
    path: str
    shard: int | None
    keys: np.ndarray


_TRIPLET_COLS = [
    "image_id",
    "subject_ann_id",
    "object_ann_id",
    "relation",
    "p_subject",
    "p_object",
    "p_relation",
]
_BOX_COLS = ["subject_box", "object_box"]


def _rg_stat(md, rg: int, name: str, which: str):
    """The row group's `which` ("min" or "max") statistic of a column (None when absent)."""
    meta = md.row_group(rg)
    for i in range(meta.num_columns):
        c = meta.column(i)
        if c.path_in_schema == name:
            st = c.statistics
            return getattr(st, which) if st is not None and st.has_min_max else None
    return None


class RelationReader:
    """Per-image records of one or more sources (mixed in the order given), after the relation-level rules.

    Args:
        sources: runs or VG files, see `resolve_source`.
        eta, rule: keep rows whose rule value >= eta (rows without a confidence are kept).
        overlap_filter: keep only pairs with overlapping boxes (run sources only, as the reference).
        check_finished: refuse runs whose ledger is incomplete (default True).
    """

    def __init__(
        self,
        sources: Iterable,
        eta: float = 0.2,
        rule: str = "relation_only",
        overlap_filter: bool = False,
        check_finished: bool = True,
    ):
        _check_settings(eta, rule)
        self.eta, self.rule, self.overlap_filter = float(eta), rule, bool(overlap_filter)
        if isinstance(sources, (str, RunSource, VGSource, tuple)):
            sources = [sources]
        self.sources: list[Source] = [resolve_source(s) for s in sources]
        if not self.sources:
            raise ValueError("RelationReader: no sources given")
        for s in self.sources:
            if isinstance(s, RunSource):
                if check_finished:
                    s.check_finished()
                s.check_settings(self.eta, self.rule)
        self.units: list[_Unit] = []
        for i, s in enumerate(self.sources):
            if isinstance(s, RunSource):
                for sh in s.plan.shards:
                    self.units.append(
                        _Unit(i, s.triplets(sh.shard), sh.shard, self._index_triplets(s, sh.shard))
                    )
            else:
                self.units.append(_Unit(i, s.path, None, self._index_vg(s)))
        self._offsets = np.cumsum([0] + [len(u.keys) for u in self.units])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def source_lengths(self) -> list[int]:
        """Kept images per source, in the order given."""
        out = [0] * len(self.sources)
        for u in self.units:
            out[u.source] += len(u.keys)
        return out

    # -- index pass: which images survive, in file order ---------------------------------------------------
    def _index_triplets(self, src: RunSource, shard: int) -> np.ndarray:
        path = src.triplets(shard)
        if not src.fs.exists(path):
            raise RunNotFinished(f"{src}: triplet file {path} is missing although the ledger records it")
        kept: list[np.ndarray] = []
        seen: set[int] = set()
        last = None
        cols = ["image_id"] + rule_columns(self.rule) + (_BOX_COLS if self.overlap_filter else [])
        with src.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            for rg in range(pf.num_row_groups):
                ids = pf.read_row_group(rg, columns=["image_id"])["image_id"].to_numpy()
                if len(ids) == 0:
                    continue
                starts = ids[np.r_[True, ids[1:] != ids[:-1]]]
                for i in starts.tolist():  # an image's rows must be contiguous (the writer sorts by image)
                    if i in seen and i != last:
                        raise ValueError(
                            f"{src}: triplet file {path}: the rows of image {i} are not contiguous (row group {rg})"
                        )
                    seen.add(i)
                    last = i
                mx = _rg_stat(md, rg, "p_relation", "max")
                if mx is not None and float(mx) < self.eta:
                    continue  # statistics: no row of this group can pass (rule values <= p_relation)
                t = pf.read_row_group(rg, columns=cols)
                mask = passing_mask(t, self.eta, self.rule).to_numpy(zero_copy_only=False)
                if self.overlap_filter:
                    sb, ob = t["subject_box"].to_pylist(), t["object_box"].to_pylist()
                    mask = mask & np.fromiter((boxes_overlap(a, b) for a, b in zip(sb, ob)), bool, len(sb))
                k = ids[mask]
                if len(k):
                    kept.append(k[np.r_[True, k[1:] != k[:-1]]])
        if not kept:
            return np.zeros(0, np.int64)
        allk = np.concatenate(kept)
        return allk[np.r_[True, allk[1:] != allk[:-1]]]  # an image split over row groups counts once

    def _index_vg(self, src: VGSource) -> np.ndarray:
        keep = [
            n for n, raw in iter_vg_records(src) if vg_image(src, n, raw, self.eta, self.rule) is not None
        ]
        return np.array(keep, dtype=np.int64)

    # -- reading ----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ImageRelations]:
        return self.iter_range(0, len(self))

    def iter_range(self, start: int, stop: int) -> Iterator[ImageRelations]:
        """The kept images at positions [start, stop) of the mixed order (sources in order, files in order)."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        for u, unit in enumerate(self.units):
            lo, hi = int(self._offsets[u]), int(self._offsets[u + 1])
            a, b = max(start, lo), min(stop, hi)
            if a >= b:
                continue
            wanted = unit.keys[a - lo : b - lo]
            src = self.sources[unit.source]
            got = 0
            it = (
                self._read_triplets(src, unit, wanted)
                if isinstance(src, RunSource)
                else self._read_vg(src, wanted)
            )
            for rec in it:
                got += 1
                yield rec
            if got != len(wanted):
                raise RuntimeError(f"{src}: {unit.path} gave {got} images where its index has {len(wanted)}; was it "
                                   "rewritten while being read?")  # fmt: skip

    def _image_records(self, src: RunSource, shard: int, wanted: np.ndarray) -> dict[int, dict]:
        """The plan's records (file name, size, every box) of the wanted images of one shard."""
        with src.fs.open(src.images(shard), "rb") as f:
            t = pq.read_table(f, columns=["image_id", "file_name", "width", "height", "boxes"])
        t = t.filter(pc.is_in(t["image_id"], value_set=pa.array(wanted, pa.int64())))
        return {r["image_id"]: r for r in t.to_pylist()}

    def _read_triplets(self, src: RunSource, unit: _Unit, wanted: np.ndarray) -> Iterator[ImageRelations]:
        images = self._image_records(src, unit.shard, wanted)
        split = posixpath.basename(src.images_root.rstrip("/"))
        lo, hi = int(wanted.min()), int(wanted.max())
        value_set = pa.array(wanted, pa.int64())
        cols = _TRIPLET_COLS + (_BOX_COLS if self.overlap_filter else [])
        cur: ImageRelations | None = None
        with src.fs.open(unit.path, "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            for rg in range(pf.num_row_groups):
                mn, mx = _rg_stat(md, rg, "image_id", "min"), _rg_stat(md, rg, "image_id", "max")
                if mn is not None and (mx < lo or mn > hi):
                    continue
                pmax = _rg_stat(md, rg, "p_relation", "max")
                if pmax is not None and float(pmax) < self.eta:
                    continue
                t = pf.read_row_group(rg, columns=cols)
                values = confidences(t, self.rule)
                mask = pc.and_(
                    pc.fill_null(pc.greater_equal(values, pa.scalar(self.eta, pa.float64())), False),
                    pc.is_in(t["image_id"], value_set=value_set),
                )
                t, values = t.filter(mask), values.filter(mask)
                c = {k: t[k].to_pylist() for k in cols}
                vals = values.to_pylist()
                for j, image_id in enumerate(c["image_id"]):
                    if self.overlap_filter and not boxes_overlap(c["subject_box"][j], c["object_box"][j]):
                        continue
                    if cur is None or cur.image_id != image_id:
                        if cur is not None:
                            yield cur
                        cur = self._new_image(src, images, image_id, split, unit.shard)
                    row = RelRow(
                        c["subject_ann_id"][j], c["object_ann_id"][j], c["relation"][j], vals[j],
                        c["p_subject"][j], c["p_object"][j], c["p_relation"][j],
                    )  # fmt: skip
                    cur.relations.append(row)
        if cur is not None:
            yield cur

    def _new_image(
        self, src: RunSource, images: dict, image_id: int, split: str, unit_shard: int
    ) -> ImageRelations:
        rec = images.get(image_id)
        if rec is None:
            raise ValueError(
                f"{src}: image {image_id} has triplets but no record in {src.images(unit_shard)}"
            )
        boxes = [
            RelBox(b["ann_id"], b["category_id"], b["label"], b["x"], b["y"], b["w"], b["h"])
            for b in rec["boxes"]
        ]
        return ImageRelations(
            str(src), image_id, posixpath.join(src.images_root, rec["file_name"]), rec["width"], rec["height"],
            src.dataset, split, src.vocabulary, boxes, [], rec["file_name"],
        )  # fmt: skip

    def _read_vg(self, src: VGSource, wanted: np.ndarray) -> Iterator[ImageRelations]:
        want, last = set(wanted.tolist()), int(wanted.max())
        for n, raw in iter_vg_records(src):
            if n > last:
                break
            if n in want:
                rec = vg_image(src, n, raw, self.eta, self.rule)
                if rec is not None:  # (None: the file changed since the index pass; iter_range says so)
                    yield rec


def iter_kept_rows(
    src: RunSource, eta: float, rule: str, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The run's triplet rows whose rule value >= eta, one filtered Arrow table per row group (for flat exports),
    with `confidence` replaced by the rule's value."""
    _check_settings(eta, rule)
    for sh in src.plan.shards:
        with src.fs.open(src.triplets(sh.shard), "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            for rg in range(pf.num_row_groups):
                pmax = _rg_stat(md, rg, "p_relation", "max")
                if pmax is not None and float(pmax) < eta:
                    continue
                t = pf.read_row_group(rg, columns=columns)
                values = confidences(t, rule)
                mask = pc.fill_null(pc.greater_equal(values, pa.scalar(float(eta), pa.float64())), False)
                t = t.filter(mask)
                if "confidence" in t.column_names:
                    i = t.column_names.index("confidence")
                    t = t.set_column(
                        i, t.schema.field(i), pc.cast(values.filter(mask), t.schema.field(i).type)
                    )
                if t.num_rows:
                    yield t
