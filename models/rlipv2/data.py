"""Tiny Visual-Genome-style training data: images with objects (boxes, names) and relationships (predicates)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from storage.paths import unsafe_name


@dataclass(slots=True)
class VGObject:
    object_id: int
    name: str
    x: float
    y: float
    w: float
    h: float


@dataclass(slots=True)
class VGRelation:
    subject_id: int
    object_id: int
    predicate: str


@dataclass(slots=True)
class VGImage:
    image_id: int
    file_name: str
    width: int
    height: int
    objects: list[VGObject] = field(default_factory=list)
    relationships: list[VGRelation] = field(default_factory=list)


def load_vg(annotation_file: str | Path) -> list[VGImage]:
    """Read the relationships JSON (a list of images, see examples/vg_tiny/README.md) and validate it."""
    raw = json.loads(Path(annotation_file).read_text())
    images = []
    for im in raw:
        objs = [VGObject(**o) for o in im["objects"]]
        ids = {o.object_id for o in objs}
        for o in objs:
            if o.w <= 0 or o.h <= 0:
                raise ValueError(
                    f"image {im['image_id']}: object {o.object_id} has w={o.w}, h={o.h}; both must be > 0"
                )
            if o.x < 0 or o.y < 0 or o.x + o.w > im["width"] + 1e-6 or o.y + o.h > im["height"] + 1e-6:
                raise ValueError(
                    f"image {im['image_id']}: object {o.object_id} box ({o.x}, {o.y}, {o.w}, {o.h}) leaves the "
                    f"{im['width']}x{im['height']} image"
                )
        rels = [VGRelation(**r) for r in im["relationships"]]
        for r in rels:
            if r.subject_id not in ids or r.object_id not in ids:
                raise ValueError(
                    f"image {im['image_id']}: relationship {r.subject_id} -{r.predicate}-> {r.object_id} names an "
                    f"object that is not in the image (objects {sorted(ids)})"
                )
        why = unsafe_name(im.get("file_name"))
        if why:
            raise ValueError(f"image {im['image_id']}: {why}")
        images.append(VGImage(im["image_id"], im["file_name"], im["width"], im["height"], objs, rels))
    return images
