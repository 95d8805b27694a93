"""The one reader of VG-format relationship files: records checked one by one, then the relation-level rules.

Every path that reads such a file (the pre-training dataset, `models.rlipv2.data.load_vg`, `reltag export` of a VG
source) comes through `vg_image`, so a file gives the same images and relations whichever path reads it:
  1. each record is checked; a bad one raises ValueError naming the file, the record's position and image id;
  2. a relation is kept when its confidence >= eta (inclusive), the confidence being, in this order: the rule's
     value from its factors (storage.rules.confidence: `p_relation`, with `p_subject` and `p_object` for
     `paper`), else its `confidence`; a relation with no factor and no `confidence` (human-labelled VG) is kept,
     one with only some of the rule's factors and no `confidence` is refused (eta could not apply to it);
  3. an image with no relation left is dropped (None).
The per-image steps that follow (the first 100 relations in file order, clamping, pairs merged multi-hot) are the
consumer's (`models.rlipv2.data.reference_item`), as for runs. Boxes are taken as written: outside the image or of
zero size they are kept (the consumer clamps them, as the reference's loader); a negative size is refused.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator

from storage.paths import unsafe_name
from storage.relations.records import ImageRelations, RelBox, RelRow
from storage.relations.sources import VGSource
from storage.rules import confidence

_IMAGE_KEYS = ("image_id", "file_name", "width", "height", "objects", "relationships")


class _Bad(ValueError):
    """A record's problem, before the file and record are named."""


def iter_vg_records(src: VGSource) -> Iterator[tuple[int, object]]:
    """(position, raw record) of every item of the file's JSON list, streamed."""
    import ijson

    with src.fs.open(src.path, "rb") as f:
        try:
            yield from enumerate(ijson.items(f, "item", use_float=True))
        except ijson.JSONError as e:
            raise ValueError(f"{src}: not a JSON list of images ({e})") from None


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{what} is {v!r}, not an integer")
    return v


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f"{what} is {v!r}, not a finite number")
    return float(v)


def _opt_num(rel: dict, key: str, what: str) -> float | None:
    v = rel.get(key)
    return None if v is None else _num(v, f"{what} {key}")


def _name(o: dict, what: str) -> str:
    name = o.get("names", o.get("name"))
    if isinstance(name, list):  # the reference's `names` may be a list of synonyms: the first is the name
        name = name[0] if name else None
    if not isinstance(name, str) or not name:
        raise _Bad(f"{what} has no name (`name` or `names`: {name!r})")
    return name


def _box(o, k: int) -> RelBox:
    if not isinstance(o, dict):
        raise _Bad(f"object #{k} is {type(o).__name__}, not a JSON object")
    if "object_id" not in o:
        raise _Bad(f"object #{k} has no 'object_id'")
    what = f"object {o['object_id']!r}"
    oid = _int(o["object_id"], f"{what}: object_id")
    x, y, w, h = (_num(o.get(c), f"{what}: {c}") for c in "xywh")
    if w < 0 or h < 0:
        raise _Bad(f"{what} has w={w}, h={h}; sizes must be >= 0")
    return RelBox(oid, -1, _name(o, what), x, y, w, h)


def _relation(rel, k: int, ids: set[int], rule: str) -> RelRow:
    if not isinstance(rel, dict):
        raise _Bad(f"relationship #{k} is {type(rel).__name__}, not a JSON object")
    for key in ("subject_id", "object_id", "predicate"):
        if key not in rel:
            raise _Bad(f"relationship #{k} has no {key!r}")
    what = f"relationship #{k}"
    s, o, pred = (
        _int(rel["subject_id"], f"{what}: subject_id"),
        _int(rel["object_id"], f"{what}: object_id"),
        rel["predicate"],
    )
    if not isinstance(pred, str) or not pred:
        raise _Bad(f"{what}: predicate is {pred!r}, not a text")
    if s not in ids or o not in ids:
        raise _Bad(
            f"relationship {s} -{pred}-> {o} names an object that is not in the image (objects {sorted(ids)})"
        )
    ps, po, pr = (_opt_num(rel, key, what) for key in ("p_subject", "p_object", "p_relation"))
    conf = _opt_num(rel, "confidence", what)
    if pr is not None and (rule == "relation_only" or (ps is not None and po is not None)):
        conf = confidence(rule, ps, po, pr)
    elif conf is None and (ps, po, pr) != (None, None, None):  # not a human row: eta must apply
        missing = [k for k, v in zip(("p_subject", "p_object", "p_relation"), (ps, po, pr)) if v is None]
        raise _Bad(f"{what} has no {', '.join(missing)} (rule {rule!r}) and no confidence")
    return RelRow(s, o, pred, conf, ps, po, pr)


def vg_image(src: VGSource, n: int, raw, eta: float, rule: str) -> ImageRelations | None:
    """Record `n` of a VG file after the relation-level rules (module docstring); None when no relation passes.

    Raises:
        ValueError: the record is malformed, naming the file, the record's position and its image id.
    """
    image_id = raw.get("image_id") if isinstance(raw, dict) else None
    where = f"{src}: record #{n}" + (f", image {image_id}" if image_id is not None else "")
    try:
        if not isinstance(raw, dict):
            raise _Bad(f"is {type(raw).__name__}, not a JSON object")
        for key in _IMAGE_KEYS:
            if key not in raw:
                raise _Bad(f"has no {key!r}")
        image_id = _int(raw["image_id"], "image_id")
        width, height = _int(raw["width"], "width"), _int(raw["height"], "height")
        if width <= 0 or height <= 0:
            raise _Bad(f"size {width}x{height} is not positive")
        name = raw["file_name"]
        why = unsafe_name(name)
        if why:  # the file's images stay under its folder: no '..', absolute paths or URLs
            raise _Bad(why)
        objects, rels = raw["objects"], raw["relationships"]
        if not isinstance(objects, list) or not isinstance(rels, list):
            raise _Bad("'objects' and 'relationships' must be lists")
        boxes = [_box(o, k) for k, o in enumerate(objects)]
        ids = {b.ann_id for b in boxes}
        if len(ids) != len(boxes):
            raise _Bad("repeats an object_id")
        rows = [_relation(r, k, ids, rule) for k, r in enumerate(rels)]
    except _Bad as e:
        raise ValueError(f"{where}: {e}") from None
    rows = [r for r in rows if r.confidence is None or r.confidence >= eta]  # NaN never passes
    if not rows:
        return None
    path = posixpath.join(posixpath.dirname(src.path), name)
    return ImageRelations(
        str(src), image_id, src.fs.unstrip_protocol(path) if "://" in src.uri else path, width, height, "vg",
        str(raw.get("data_split", "")), None, boxes, rows, name,
    )  # fmt: skip
