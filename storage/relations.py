"""Streaming reader of relation triplets for pre-training: finished reltag runs and VG-format JSON, per image.

What it does, in the reference loader's order (RLIPv2 `datasets/mixed_dataset.py: MixedRelDetection`):
  1. keep a relation when its confidence >= eta (inclusive); the confidence is the rule's value re-computed from
     the stored factors (`relation_only`: p_relation, the reference code; `paper`: p_subject * p_object *
     p_relation); a row without a confidence (human-labelled VG) is kept;
  2. optionally (`overlap_filter`) keep only pairs whose boxes overlap (the reference's `check_overlap`, on the
     unclamped boxes; not applied to VG files, as in the reference);
  3. drop images with no relation left.
The per-image steps that follow (the first 100 relations, clamping, texts, multi-hot pairs) belong to the
consumer (`models.rlipv2.data`); this module yields every surviving relation of an image in file order.

Reading streams one Parquet row group at a time, reads only the columns it needs, and skips row groups whose
statistics exclude them (max p_relation < eta, or image ids outside the wanted range): the whole dataset is
never in memory. An index pass (image ids and the confidence columns only) fixes the kept images' order, so
`iter_range(start, stop)` gives any contiguous slice: ranks and DataLoader workers take disjoint slices.
A run that is not finished (its ledger lacks a shard's write marker, or its statistics are missing) is refused.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from storage.atomic import read_json
from storage.layout import RunLayout, shard_name
from storage.ledger import Ledger, Unit
from storage.manifest import PlanManifest, RunRecord
from storage.paths import unsafe_name
from storage.records import Box

RULES = ("relation_only", "paper")

#: dataset names as the reference's loader spells them, by the run's match vocabulary
DATASET_OF_VOCABULARY = {"o365": "o365", "coco": "coco2017"}


class RunNotFinished(ValueError):
    """The run's ledger says some of it is not written yet."""


#: One annotated box of an image: x, y, w, h in pixels as planned (not clamped); category_id -1 for VG files.
RelBox = Box


@dataclass(slots=True)
class RelRow:
    """One kept relation row. confidence: the rule's value (None for rows without one, e.g. human VG)."""

    subject_id: int
    object_id: int
    relation: str
    confidence: float | None
    p_subject: float | None = None
    p_object: float | None = None
    p_relation: float | None = None


@dataclass(slots=True)
class ImageRelations:
    """One image with every box and every kept relation, in file order.

    file_name: the image's path (images root joined). dataset: "o365" / "coco2017" (a run, by its vocabulary)
    or "vg" (a VG file). vocabulary: the run's class-key vocabulary (None for VG: boxes carry their names).
    """

    source: str
    image_id: int
    file_name: str
    width: int
    height: int
    dataset: str
    data_split: str
    vocabulary: str | None
    boxes: list[RelBox] = field(default_factory=list)
    relations: list[RelRow] = field(default_factory=list)
    relative_name: str = (
        ""  # the file name as planned (relative to the run's images root) or as in the VG file
    )


def check_overlap(b1, b2) -> bool:
    """The reference's overlap test on (x, y, w, h): centre distance strictly below the half-sizes' sum, both axes."""
    cx1, cy1 = b1[0] + b1[2] / 2, b1[1] + b1[3] / 2
    cx2, cy2 = b2[0] + b2[2] / 2, b2[1] + b2[3] / 2
    return abs(cx1 - cx2) < b1[2] / 2 + b2[2] / 2 and abs(cy1 - cy2) < b1[3] / 2 + b2[3] / 2


def rule_value(rule: str, p_subject, p_object, p_relation) -> float:
    """The confidence under a rule, in float64 from the stored factors (the same order of products as threshold)."""
    if rule == "relation_only":
        return float(p_relation)
    if rule == "paper":
        return float(p_subject) * float(p_object) * float(p_relation)
    raise ValueError(f"unknown confidence rule {rule!r}; expected one of {list(RULES)}")


def rule_values(table: pa.Table, rule: str) -> pa.Array:
    """`rule_value` over a table's factor columns, as float64 (no float32 rounding of the product or of eta)."""
    pr = pc.cast(table["p_relation"], pa.float64())
    if rule == "relation_only":
        return pr
    if rule == "paper":
        ps, po = pc.cast(table["p_subject"], pa.float64()), pc.cast(table["p_object"], pa.float64())
        return pc.multiply(pc.multiply(ps, po), pr)
    raise ValueError(f"unknown confidence rule {rule!r}; expected one of {list(RULES)}")


def threshold_mask(table: pa.Table, eta: float, rule: str) -> pa.Array:
    """Rows whose rule value >= eta (NaN and null: False)."""
    return pc.fill_null(
        pc.greater_equal(rule_values(table, rule), pa.scalar(float(eta), pa.float64())), False
    )


def _rule_columns(rule: str) -> list[str]:
    return ["p_relation"] if rule == "relation_only" else ["p_subject", "p_object", "p_relation"]


def _check_settings(eta: float, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown confidence rule {rule!r}; expected one of {list(RULES)}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta {eta} is outside [0, 1]")


# ---------------------------------------------------------------------------------------------------- sources


@dataclass
class RunSource:
    """A finished reltag run: its plan folder (path or fsspec URI) and run key."""

    plan_dir: str
    run_key: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    path: str = field(init=False, repr=False)
    record: RunRecord = field(init=False, repr=False)
    plan: PlanManifest = field(init=False, repr=False)

    def __post_init__(self):
        self.fs, self.path = url_to_fs(self.plan_dir)
        rec = posixpath.join(self.path, "runs", f"{self.run_key}.json")
        if not self.fs.exists(rec):
            raise FileNotFoundError(f"run {self.run_key}: no run record {rec}")
        self.record = RunRecord.from_dict(read_json(self.fs, rec))
        self.plan = PlanManifest.from_dict(read_json(self.fs, posixpath.join(self.path, "plan.json")))

    def __str__(self) -> str:
        return f"run {self.run_key} ({self.plan_dir})"

    @property
    def layout(self) -> RunLayout:
        root = self.fs.unstrip_protocol(posixpath.dirname(posixpath.dirname(self.path)))
        return RunLayout(
            root, self.record.dataset, self.run_key, self.record.plan_key, self.record.stage_keys
        )

    def triplets(self, shard: int) -> str:
        return posixpath.join(self.path, "triplets", self.run_key, f"{shard_name(shard)}.parquet")

    def images(self, shard: int) -> str:
        return posixpath.join(self.path, "images", f"{shard_name(shard)}.parquet")

    @property
    def vocabulary(self) -> str:
        return self.record.config.get("match", {}).get("vocabulary", "o365")

    @property
    def dataset(self) -> str:
        return DATASET_OF_VOCABULARY.get(self.vocabulary, self.vocabulary)

    @property
    def images_root(self) -> str:
        return self.record.inputs.get("images_root", "")

    def missing(self) -> list[str]:
        """What the ledger lacks for this run to count as finished (empty: finished)."""
        layout = self.layout
        write = self.record.chain[-1].stage if self.record.chain else "write"
        snap = Ledger(layout).snapshot()
        unwritten = [sh.shard for sh in self.plan.shards if Unit(write, sh.shard).rel() not in snap["done"]]
        out = []
        if unwritten:
            out.append(
                f"{len(unwritten)} of {len(self.plan.shards)} shards have no '{write}' record {unwritten[:10]}"
            )
        if not self.fs.exists(layout.run_stats):
            out.append(f"the run statistics {layout.run_stats} are not written")
        if out and snap["failed"]:  # (the same test as flows/status.is_finished; failures only explain it)
            out.append(f"{len(snap['failed'])} failed units {sorted(snap['failed'])[:5]}")
        return out

    def check_finished(self) -> None:
        miss = self.missing()
        if miss:
            raise RunNotFinished(
                f"{self} is not finished: {'; '.join(miss)} (`reltag status --out ROOT --run-key {self.run_key}` "
                "shows what is left; rerunning `reltag run` finishes it)"
            )

    def rejected_passing(self, eta: float, rule: str) -> int:
        """How many rows this run rejected below its eta would pass `rule >= eta` (read from rejects/, factor
        columns only). Rows it rejected for another reason (overlap, top-K) stay out: those are the run's choice."""
        folder = posixpath.join(self.path, "rejects", self.layout.key("threshold"))
        n = 0
        for p in sorted(self.fs.glob(posixpath.join(folder, "*", "*.parquet"))):
            if posixpath.basename(p).startswith("."):
                continue
            with self.fs.open(p, "rb") as f:
                t = pq.read_table(f, columns=["reason", "p_subject", "p_object", "p_relation"])
            t = t.filter(pc.equal(t["reason"], "below_eta"))
            n += pc.sum(threshold_mask(t, eta, rule).cast(pa.int64())).as_py() or 0
        return n

    def check_settings(self, eta: float, rule: str) -> None:
        """Refuse reading at an (eta, rule) that would accept rows this run rejected: its triplets hold only the
        rows it accepted (the rest are rejects, without boxes)."""
        th = self.record.config.get("threshold", {})
        tagger = self.record.config.get("tag", {}).get("tagger")
        run_rule = th.get("rule", "paper")
        run_eta = th.get("clip_eta", 0.8) if tagger == "clip" else th.get("eta", 0.2)
        # product <= p_relation (factors in [0, 1]), so `paper` at eta is inside `relation_only` at the same eta
        if float(eta) >= float(run_eta) and (run_rule == rule or run_rule == "relation_only"):
            return
        n = self.rejected_passing(eta, rule)  # not a subset by its settings: is it one by its data?
        if n:
            raise ValueError(
                f"{self} kept rows with rule {run_rule!r} >= {run_eta}; reading at rule {rule!r} >= {eta} needs {n} "
                f"row(s) it rejected. Rerun its threshold stage with `reltag run ... --rule {rule} --eta {eta}` (only "
                "threshold and write are redone) and read that run"
            )


def is_json_list(fs, path: str) -> bool:
    """Whether a JSON file holds a list (a VG-format relationships file) rather than an object (e.g. a
    labelling run's record), from its first bytes."""
    with fs.open(path, "rb") as f:
        return f.read(256).lstrip().startswith(b"[")


@dataclass
class VGSource:
    """A VG-format relationships JSON (examples/vg_tiny): a list of images with `image_id`, `file_name`, `width`,
    `height`, `objects` [{object_id, name (or names), x, y, w, h}], `relationships` [{subject_id, object_id,
    predicate, optional confidence / p_subject, p_object, p_relation}]. Image paths are relative to the file."""

    uri: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    path: str = field(init=False, repr=False)

    def __post_init__(self):
        self.fs, self.path = url_to_fs(self.uri)
        if not self.fs.exists(self.path):
            raise FileNotFoundError(f"VG file {self.uri} does not exist")
        if not is_json_list(self.fs, self.path):
            raise ValueError(
                f"{self.uri} is not a VG-format relationships file (a JSON list of images); a labelling run is "
                "named by its plan folder (the path `reltag run` prints) or <plan folder>/runs/<run key>.json"
            )

    def __str__(self) -> str:
        return f"VG file {self.uri}"


Source = RunSource | VGSource


def resolve_source(src) -> Source:
    """A source from what a user names: a RunSource / VGSource; (plan_dir, run_key); a plan folder (with one run);
    a `runs/<key>.json` run record; a `triplets/<key>` folder; or a VG JSON file."""
    if isinstance(src, (RunSource, VGSource)):
        return src
    if isinstance(src, tuple) and len(src) == 2:
        return RunSource(str(src[0]), str(src[1]))
    s = str(src)
    fs, path = url_to_fs(s)
    path = path.rstrip("/")
    unstrip = fs.unstrip_protocol if "://" in s else (lambda p: p)
    if fs.isdir(path):
        if fs.exists(posixpath.join(path, "plan.json")):
            keys = sorted(
                posixpath.basename(p)[: -len(".json")]
                for p in fs.glob(posixpath.join(path, "runs", "*.json"))
            )
            if len(keys) != 1:
                raise ValueError(
                    f"plan folder {s} holds {len(keys)} runs {keys}; name one: (plan folder, run key) or "
                    f"{s}/runs/<run key>.json"
                )
            return RunSource(s, keys[0])
        parent = posixpath.dirname(path)
        if posixpath.basename(parent) == "triplets" and fs.exists(
            posixpath.join(posixpath.dirname(parent), "plan.json")
        ):
            return RunSource(unstrip(posixpath.dirname(parent)), posixpath.basename(path))
        raise ValueError(f"{s} is neither a plan folder (no plan.json) nor a triplets/<run key> folder")
    if not fs.exists(path):
        raise FileNotFoundError(f"source {s} does not exist")
    parent = posixpath.dirname(path)
    if (
        path.endswith(".json")
        and posixpath.basename(parent) == "runs"
        and fs.exists(posixpath.join(posixpath.dirname(parent), "plan.json"))
    ):
        return RunSource(unstrip(posixpath.dirname(parent)), posixpath.basename(path)[: -len(".json")])
    return VGSource(s)


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


def _vg_value(rel: dict, rule: str) -> float | None:
    """A VG row's confidence under the rule: from its factors when it has them, else its `confidence`, else None."""
    if "p_relation" in rel and (rule == "relation_only" or ("p_subject" in rel and "p_object" in rel)):
        return rule_value(rule, rel.get("p_subject"), rel.get("p_object"), rel["p_relation"])
    c = rel.get("confidence")
    return None if c is None else float(c)


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
        cols = ["image_id"] + _rule_columns(self.rule) + (_BOX_COLS if self.overlap_filter else [])
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
                mask = threshold_mask(t, self.eta, self.rule).to_numpy(zero_copy_only=False)
                if self.overlap_filter:
                    sb, ob = t["subject_box"].to_pylist(), t["object_box"].to_pylist()
                    mask = mask & np.fromiter((check_overlap(a, b) for a, b in zip(sb, ob)), bool, len(sb))
                k = ids[mask]
                if len(k):
                    kept.append(k[np.r_[True, k[1:] != k[:-1]]])
        if not kept:
            return np.zeros(0, np.int64)
        allk = np.concatenate(kept)
        return allk[np.r_[True, allk[1:] != allk[:-1]]]  # an image split over row groups counts once

    def _vg_images(self, src: VGSource) -> Iterator[tuple[int, dict]]:
        import ijson

        with src.fs.open(src.path, "rb") as f:
            try:
                yield from enumerate(ijson.items(f, "item", use_float=True))
            except ijson.JSONError as e:
                raise ValueError(f"{src}: not a JSON list of images ({e})") from None

    def _vg_kept_rows(self, src: VGSource, n: int, im: dict) -> list[RelRow]:
        for k in ("image_id", "objects", "relationships"):
            if k not in im:
                raise ValueError(f"{src}: image #{n} has no {k!r}")
        rows = []
        for rel in im["relationships"]:
            v = _vg_value(rel, self.rule)
            if v is None or v >= self.eta:
                rows.append(
                    RelRow(
                        int(rel["subject_id"]), int(rel["object_id"]), str(rel["predicate"]), v,
                        rel.get("p_subject"), rel.get("p_object"), rel.get("p_relation"),
                    )
                )  # fmt: skip
        return rows

    def _index_vg(self, src: VGSource) -> np.ndarray:
        return np.array(
            [n for n, im in self._vg_images(src) if self._vg_kept_rows(src, n, im)], dtype=np.int64
        )

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
                values = rule_values(t, self.rule)
                mask = pc.and_(
                    pc.fill_null(pc.greater_equal(values, pa.scalar(self.eta, pa.float64())), False),
                    pc.is_in(t["image_id"], value_set=value_set),
                )
                t, values = t.filter(mask), values.filter(mask)
                c = {k: t[k].to_pylist() for k in cols}
                vals = values.to_pylist()
                for j, image_id in enumerate(c["image_id"]):
                    if self.overlap_filter and not check_overlap(c["subject_box"][j], c["object_box"][j]):
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
        want = set(wanted.tolist())
        last = int(wanted.max())
        base = posixpath.dirname(src.path)
        for n, im in self._vg_images(src):
            if n > last:
                break
            if n not in want:
                continue
            rows = self._vg_kept_rows(src, n, im)
            for k in ("file_name", "width", "height"):
                if k not in im:
                    raise ValueError(f"{src}: image {im['image_id']} has no {k!r}")
            boxes = []
            for o in im["objects"]:
                name = o.get("names", o.get("name"))
                if isinstance(name, list):
                    name = name[0] if name else None
                if name is None:
                    raise ValueError(f"{src}: image {im['image_id']} object {o.get('object_id')} has no name")
                boxes.append(
                    RelBox(
                        int(o["object_id"]),
                        -1,
                        str(name),
                        float(o["x"]),
                        float(o["y"]),
                        float(o["w"]),
                        float(o["h"]),
                    )
                )
            ids = {b.ann_id for b in boxes}
            if len(ids) != len(boxes):
                raise ValueError(f"{src}: image {im['image_id']} repeats an object_id")
            for r in rows:
                if r.subject_id not in ids or r.object_id not in ids:
                    raise ValueError(
                        f"{src}: image {im['image_id']}: relationship {r.subject_id} -{r.relation}-> {r.object_id} "
                        f"names an object that is not in the image (objects {sorted(ids)})"
                    )
            why = unsafe_name(str(im["file_name"]))
            if why:  # the file's images stay under its folder: no '..', absolute paths or URLs
                raise ValueError(f"{src}: image {im['image_id']}: {why}")
            file_name = posixpath.join(base, im["file_name"])
            yield ImageRelations(
                str(src), int(im["image_id"]), src.fs.unstrip_protocol(file_name) if "://" in src.uri else file_name,
                int(im["width"]), int(im["height"]), "vg", str(im.get("data_split", "")), None, boxes, rows,
                str(im["file_name"]),
            )  # fmt: skip


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
                values = rule_values(t, rule)
                mask = pc.fill_null(pc.greater_equal(values, pa.scalar(float(eta), pa.float64())), False)
                t = t.filter(mask)
                if "confidence" in t.column_names:
                    i = t.column_names.index("confidence")
                    t = t.set_column(
                        i, t.schema.field(i), pc.cast(values.filter(mask), t.schema.field(i).type)
                    )
                if t.num_rows:
                    yield t
