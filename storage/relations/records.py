"""What the pre-training reader yields: one image with its boxes and its kept relations."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.records import Box

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
