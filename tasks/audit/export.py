"""Export a finished run's relations at an (eta, rule): the reference's VG-style JSON, or a flat Parquet copy.

Both stream (one image, or one row group, at a time) and write atomically (temporary name, rename at the end).
"""

from __future__ import annotations

import json
from contextlib import ExitStack

from fsspec.core import url_to_fs

from models.rlipv2.data import box_name
from storage.atomic import ParquetBatchWriter, atomic_open
from storage.relations import RelationReader, RunSource, iter_kept_rows, resolve_source
from storage.schemas import TRIPLETS


def vg_json_image(rec, first_relationship_id: int) -> dict:
    """One image as the reference's training code reads it; keys in its order. Every box of the image is listed
    (its names feed the text labels), with the run's class key as `names`; `confidence` is the rule's value
    (absent for rows without one)."""
    objects = [
        {"object_id": b.ann_id, "x": float(b.x), "y": float(b.y), "w": float(b.w), "h": float(b.h),
         "names": box_name(rec, b.category_id, b.label)}
        for b in rec.boxes
    ]  # fmt: skip
    rels = []
    for i, r in enumerate(rec.relations):
        rel = {
            "relationship_id": first_relationship_id + i,
            "predicate": r.relation,
            "subject_id": r.subject_id,
            "object_id": r.object_id,
        }
        if r.confidence is not None:
            rel["confidence"] = float(r.confidence)
        rels.append(rel)
    return {
        "image_id": int(rec.image_id),
        "dataset": rec.dataset,
        "data_split": rec.data_split,
        "objects": objects,
        "relationships": rels,
    }


def export_vg_json(
    source, dest: str, eta: float = 0.2, rule: str = "relation_only", image_paths: str | None = None
) -> dict:
    """Write the images with at least one relation passing `rule >= eta` as one JSON list, image by image.

    Relations are all the kept rows of an image in file order (the reference's loader itself keeps the first 100);
    relationship ids run over the file from 0. `image_paths`: also write {"<image_id>": file name relative to the
    images root} for the exported images, the `image_id_to_filepath.json` the reference's loader reads for
    Objects365 (COCO images it finds as <data_split>/<image_id:012d>.jpg). Returns counts: images, objects,
    relationships, bytes.
    """
    reader = RelationReader([source], eta, rule, overlap_filter=False)
    fs, path = url_to_fs(dest)
    counts = {"images": 0, "objects": 0, "relationships": 0}
    with ExitStack() as stack:
        f = stack.enter_context(atomic_open(fs, path, "wb"))
        g = None
        if image_paths is not None:
            pfs, ppath = url_to_fs(image_paths)
            g = stack.enter_context(atomic_open(pfs, ppath, "wb"))
            g.write(b"{")
        f.write(b"[")
        for rec in reader:
            blob = json.dumps(vg_json_image(rec, counts["relationships"]), ensure_ascii=False).encode()
            sep = b"\n" if counts["images"] == 0 else b",\n"
            f.write(sep + blob)
            if g is not None:
                g.write(
                    sep
                    + json.dumps({str(rec.image_id): rec.relative_name}, ensure_ascii=False)[1:-1].encode()
                )
            counts["images"] += 1
            counts["objects"] += len(rec.boxes)
            counts["relationships"] += len(rec.relations)
        f.write(b"\n]\n")
        if g is not None:
            g.write(b"\n}\n")
    return {**counts, "bytes": fs.size(path)}


def export_parquet(source, dest: str, eta: float = 0.2, rule: str = "relation_only") -> dict:
    """A flat copy of the run's triplet rows passing `rule >= eta` (the triplet schema; `confidence` holds the
    rule's value), one zstd Parquet file written row group by row group. Returns rows and bytes."""
    src = resolve_source(source)
    if not isinstance(src, RunSource):
        raise ValueError(f"export --format parquet takes a reltag run, not {src}")
    src.check_finished()
    src.check_settings(eta, rule)
    fs, path = url_to_fs(dest)
    with ParquetBatchWriter(fs, path, TRIPLETS) as w:
        for table in iter_kept_rows(src, eta, rule, columns=TRIPLETS.names):
            w.write(table)
    return {"rows": w.rows, "bytes": w.bytes}
