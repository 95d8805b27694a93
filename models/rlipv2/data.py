"""Training data: VG-style images with objects (boxes, names) and relationships (predicates); the pre-training
dataset over finished reltag runs and VG files (`RelationDataset`, the reference's `MixedRelDetection` rules)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from storage.relations import ImageRelations, RelationReader


@dataclass(slots=True)
class VGObject:
    object_id: int
    name: str
    x: float
    y: float
    w: float
    h: float
    xyxy: list[float] | None = None  # RelationDataset: the box as x0, y0, x1, y1 pixels, clamped to the image


@dataclass(slots=True)
class VGRelation:
    subject_id: int
    object_id: int
    predicate: str
    confidence: float | None = None  # RelationDataset: the rule's value (None: a row without one)


@dataclass(slots=True)
class VGImage:
    """One training image, as `reference_item` builds it (`load_vg` and `RelationDataset` both use it).

    The extras, in the reference loader's form: object_texts (unique class names of all boxes,
    first seen first), labels (per object, its index in object_texts), relation_texts (unique predicates of the
    kept relations, first seen first), pairs ((subject object_id, object object_id), first seen first) with
    pair_labels (per pair, a multi-hot list over relation_texts), image (the decoded image or the transform's
    result when the dataset decodes, else None).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    objects: list[VGObject] = field(default_factory=list)
    relationships: list[VGRelation] = field(default_factory=list)
    dataset: str = "vg"
    data_split: str = ""
    object_texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    relation_texts: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    pair_labels: list[list[int]] = field(default_factory=list)
    image: Any = None


def load_vg(
    annotation_file: str | Path, eta: float = 0.2, rule: str = "relation_only", max_relations: int = 100
) -> list[VGImage]:
    """A VG-format relationships file (examples/vg_tiny/README.md) as training items, by the one VG reader's rules
    (storage.relations.vg: records checked, relations with confidence >= eta, empty images dropped) and the
    reference's per-image steps (`reference_item`). File names stay relative to the file's folder, where
    `models.rlipv2.train.make_batch` resolves them. Raises ValueError naming the file and record for a bad one."""
    out = []
    for rec in RelationReader([str(annotation_file)], eta, rule):
        item = reference_item(rec, max_relations)
        item.file_name = rec.relative_name
        out.append(item)
    return out


def box_name(rec: ImageRelations, category_id: int, label: str) -> str:
    """A box's class name as the reference names it: the run vocabulary's class key; a VG box's own name."""
    if rec.vocabulary is None:
        return label
    from models.rlipv2.vocab import key_for_category

    try:
        return key_for_category(rec.vocabulary, category_id)
    except ValueError as e:
        raise ValueError(f"{rec.source}: image {rec.image_id}: {e}") from None


def reference_item(rec: ImageRelations, max_relations: int = 100) -> VGImage:
    """One image in the form the reference's loader builds (`MixedRelDetection.__getitem__`, img_set 'pretrain').

    Steps, in its order: the first `max_relations` kept relations in file order (duplicates count); every box
    xywh -> xyxy in float32, clamped to [0, width] x [0, height] (a degenerate box stays); object texts over all
    boxes, relation texts over the kept relations, both unique in first-seen order; rows with the same
    (subject, object) pair, first seen first, merged into one pair with a multi-hot predicate list.
    """
    rels = rec.relations[:max_relations]
    n = len(rec.boxes)
    b = np.array([[x.x, x.y, x.w, x.h] for x in rec.boxes], dtype=np.float32).reshape(n, 4)
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)  # float32 sums, as the reference's tensor
    xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], np.float32(0), np.float32(rec.width))
    xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], np.float32(0), np.float32(rec.height))
    wh = xyxy[:, 2:] - xyxy[:, :2]
    objects, texts, labels = [], {}, []
    for i, box in enumerate(rec.boxes):
        name = box_name(rec, box.category_id, box.label)
        labels.append(texts.setdefault(name, len(texts)))
        x0, y0, x1, y1 = (float(v) for v in xyxy[i])
        objects.append(VGObject(box.ann_id, name, x0, y0, float(wh[i, 0]), float(wh[i, 1]), [x0, y0, x1, y1]))
    rel_texts: dict[str, int] = {}
    for r in rels:
        rel_texts.setdefault(r.relation, len(rel_texts))
    pair_index: dict[tuple[int, int], int] = {}
    pair_labels: list[list[int]] = []
    for r in rels:
        key = (r.subject_id, r.object_id)
        if key not in pair_index:
            pair_index[key] = len(pair_labels)
            pair_labels.append([0] * len(rel_texts))
        pair_labels[pair_index[key]][rel_texts[r.relation]] = 1
    return VGImage(
        rec.image_id, rec.file_name, rec.width, rec.height, objects,
        [VGRelation(r.subject_id, r.object_id, r.relation, r.confidence) for r in rels],
        rec.dataset, rec.data_split, list(texts), labels, list(rel_texts), list(pair_index), pair_labels,
    )  # fmt: skip


def _sorted_by_count(counts: dict[str, int]) -> dict[str, int]:
    # most frequent first; equal counts keep their first-seen order (a stable sort, as the reference's)
    return dict(sorted(counts.items(), key=lambda kv: kv[1], reverse=True))


def fuse_frequencies(per_source: list[tuple[dict[str, int], dict[str, int]]]) -> dict:
    """Per-source (relation counts, object counts), each sorted by count, fused in source order and re-sorted,
    as the reference fuses the keep_names_freq of its datasets."""
    rel: dict[str, int] = {}
    obj: dict[str, int] = {}
    for r, o in per_source:
        for k, v in _sorted_by_count(r).items():
            rel[k] = rel.get(k, 0) + v
        for k, v in _sorted_by_count(o).items():
            obj[k] = obj.get(k, 0) + v
    rel, obj = _sorted_by_count(rel), _sorted_by_count(obj)
    return {
        "relationship_names": list(rel),
        "object_names": list(obj),
        "relationship_freq": rel,
        "object_freq": obj,
    }


def _shuffled(items, size: int, key: tuple) -> Iterable:
    """A streaming shuffle: keep `size` items, yield a random one of them as each new one arrives."""
    import random

    rng = random.Random(json.dumps(key))  # a string seed: the same order in every process and Python run
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


class RelationDataset(torch.utils.data.IterableDataset):
    """Pre-training images from finished reltag runs and VG files, by the reference loader's rules.

    Items are `VGImage`s (`models.rlipv2.train.make_batch` takes them as they are; the reference's merged form is
    in their extra fields). Relation-level rules (eta, rule, overlap filter, empty images dropped) are applied by
    `storage.relations.RelationReader`, streaming; per-image rules by `reference_item`.

    Sharding: the kept images, in source and file order, are cut into `world_size` contiguous blocks (rank r
    takes [r*N//W, (r+1)*N//W)); DataLoader workers split their rank's block the same way, so every image is
    read by exactly one (rank, worker) and each reads only the files its block covers. Ranks differ by at most
    one image (nothing is padded or repeated).

    Args:
        sources: finished runs (plan folder, `runs/<key>.json`, `triplets/<key>` or (plan folder, run key)) and
            VG JSON files, mixed in the order given.
        eta, rule: keep relations whose rule value (`relation_only`: p_relation; `paper`: the product) >= eta.
        overlap_filter: the reference's pair-overlap filter (run sources only).
        max_relations: relations kept per image, in file order (the reference: num_queries 200 // 2).
        rank, world_size: this process's share (DistributedDataParallel).
        decode: open each image (RGB) in the DataLoader worker into `item.image`; `transform(image, item)`, when
            given, replaces it by its result (e.g. a tensor).
        shuffle_buffer, seed: with a buffer of K > 0 items, each worker yields its images in a random order drawn
            from (seed, epoch, rank, worker) (a streaming shuffle through a window of K images);
            `set_epoch(e)` changes the order per epoch, the same on every rerun. 0: file order.
    """

    def __init__(
        self,
        sources: Iterable | str,
        eta: float = 0.2,
        rule: str = "relation_only",
        overlap_filter: bool = False,
        max_relations: int = 100,
        rank: int = 0,
        world_size: int = 1,
        *,
        decode: bool = False,
        transform: Callable[[Any, VGImage], Any] | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if max_relations < 1:
            raise ValueError(f"max_relations {max_relations} must be >= 1")
        self.reader = RelationReader(sources, eta, rule, overlap_filter)
        self.max_relations, self.rank, self.world_size = max_relations, rank, world_size
        self.decode, self.transform = decode or transform is not None, transform
        n = len(self.reader)
        self.start, self.stop = rank * n // world_size, (rank + 1) * n // world_size
        self._freq: dict | None = None
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer {shuffle_buffer} must be >= 0")
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffled order the next iteration yields (as DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Images of this rank."""
        return self.stop - self.start

    @property
    def total(self) -> int:
        """Images of all ranks together."""
        return len(self.reader)

    def __iter__(self):
        start, stop, worker = self.start, self.stop, 0
        info = torch.utils.data.get_worker_info()
        if info is not None:
            n, worker = stop - start, info.id
            start, stop = start + worker * n // info.num_workers, start + (worker + 1) * n // info.num_workers
        recs = self.reader.iter_range(start, stop)
        if self.shuffle_buffer:
            recs = _shuffled(recs, self.shuffle_buffer, (self.seed, self.epoch, self.rank, worker))
        for rec in recs:
            item = reference_item(rec, self.max_relations)
            if self.decode:
                item.image = self._load(item)
            yield item

    def _load(self, item: VGImage):
        import fsspec
        from PIL import Image

        with fsspec.open(item.file_name, "rb") as f:
            img = Image.open(f)
            img.load()
        img = img.convert("RGB")
        return self.transform(img, item) if self.transform is not None else img

    def class_frequencies(self, cache: str | Path | None = None) -> dict:
        """Relation-text and class-name frequencies over the whole dataset (all ranks), for the reference's
        frequency-based negative text sampling: {relationship_names, object_names, relationship_freq,
        object_freq}, most frequent first. Relations: every kept row (before the per-image cap of
        `max_relations`); objects: every box of every kept image (the reference also counts the boxes of images
        that thresholding left empty; those are not in an exported file, so reading the export gives these same
        counts). Ties keep their first-seen order, per source then fused in source order, as the reference's
        `fuse_multi_keep_names_freq`. Computed once (one streaming pass) and kept;
        with `cache`, read from / written to that JSON file (keyed by the sources and settings)."""
        if self._freq is not None:
            return self._freq
        key = {
            "sources": [str(s) for s in self.reader.sources],
            "eta": self.reader.eta,
            "rule": self.reader.rule,
            "overlap_filter": self.reader.overlap_filter,
            "images": len(self.reader),
        }
        if cache is not None and Path(cache).exists():
            stored = json.loads(Path(cache).read_text())
            if stored.get("key") == key:
                self._freq = stored["frequencies"]
                return self._freq
        per_source = [(Counter(), Counter()) for _ in self.reader.sources]
        index = {str(s): i for i, s in enumerate(self.reader.sources)}
        for rec in self.reader:
            rel, obj = per_source[index[rec.source]]
            for r in rec.relations:
                rel[r.relation] += 1
            for b in rec.boxes:
                obj[box_name(rec, b.category_id, b.label)] += 1
        self._freq = fuse_frequencies([(dict(r), dict(o)) for r, o in per_source])
        if cache is not None:  # not write_json: its sorted keys would lose the frequency order
            from fsspec.implementations.local import LocalFileSystem

            from storage.atomic import atomic_open

            blob = json.dumps({"key": key, "frequencies": self._freq}, indent=1).encode()
            with atomic_open(LocalFileSystem(), str(Path(cache).resolve()), "wb") as f:
                f.write(blob)
        return self._freq
