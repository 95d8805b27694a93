"""One explicit pyarrow schema per record type; never inferred from the first row."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from storage import records as r

_box = pa.list_(pa.float32(), 4)  # x, y, w, h in pixels
_ids = pa.list_(pa.int16())

IMAGES = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("file_name", pa.string(), False),
        ("width", pa.int32(), False),
        ("height", pa.int32(), False),
        ("shard", pa.int32(), False),
        (
            "boxes",
            pa.list_(
                pa.struct(
                    [
                        ("ann_id", pa.int64()),
                        ("category_id", pa.int32()),
                        ("label", pa.string()),
                        ("x", pa.float32()),
                        ("y", pa.float32()),
                        ("w", pa.float32()),
                        ("h", pa.float32()),
                    ]
                )
            ),
            False,
        ),
        # additions (nullable, so images files written before them still read, as nulls)
        ("box_file_index", pa.list_(pa.int64()), True),
        ("class_order", pa.list_(pa.int32()), True),
    ]
)

CAPTIONS = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("caption_id", pa.int16(), False),
        ("text", pa.string(), False),
        ("is_duplicate", pa.bool_(), False),
        ("captioner", pa.string(), False),
        ("captioner_revision", pa.string(), False),
        ("sampling", pa.string(), False),
        # addition (nullable): the captions file's annotation id of a human caption; null for generated ones
        ("source_id", pa.int64(), True),
    ]
)

PARSES = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("caption_id", pa.int16(), False),
        ("subject_text", pa.string(), False),
        ("subject_head", pa.string(), False),
        ("relation", pa.string(), False),
        ("relation_lemma", pa.string(), False),
        ("object_text", pa.string(), False),
        ("object_head", pa.string(), False),
    ]
)

_pair = [
    ("image_id", pa.int64(), False),
    ("subject_ann_id", pa.int64(), False),
    ("object_ann_id", pa.int64(), False),
    ("subject_category_id", pa.int32(), False),
    ("object_category_id", pa.int32(), False),
    ("subject_label", pa.string(), False),
    ("object_label", pa.string(), False),
    ("relation", pa.string(), False),
    ("relation_lemma", pa.string(), False),
    ("caption_ids", _ids, False),
    ("n_captions", pa.int16(), False),
]

CANDIDATES = pa.schema(
    _pair
    + [
        ("subject_rule", pa.string(), False),
        ("subject_synonym", pa.string(), False),
        ("object_rule", pa.string(), False),
        ("object_synonym", pa.string(), False),
    ]
)

REGION_CAPTIONS = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("box_a_ann_id", pa.int64(), False),
        ("box_b_ann_id", pa.int64(), False),
        ("union_box", _box, False),
        ("caption_id", pa.int16(), False),
        ("text", pa.string(), False),
        ("captioner", pa.string(), False),
        ("captioner_revision", pa.string(), False),
        ("sampling", pa.string(), False),
        ("n_relations", pa.int16(), False),
        # the candidate it gave (null: none)
        ("subject_ann_id", pa.int64(), True),
        ("object_ann_id", pa.int64(), True),
        ("subject_category_id", pa.int32(), True),
        ("object_category_id", pa.int32(), True),
        ("subject_label", pa.string(), True),
        ("object_label", pa.string(), True),
        ("relation", pa.string(), True),
        ("relation_lemma", pa.string(), True),
        ("subject_rule", pa.string(), True),
        ("subject_synonym", pa.string(), True),
        ("object_rule", pa.string(), True),
        ("object_synonym", pa.string(), True),
        ("is_new", pa.bool_(), True),
    ]
)

_factors = [
    ("p_subject", pa.float32(), False),
    ("p_object", pa.float32(), False),
    ("p_relation", pa.float32(), False),
    ("confidence", pa.float32(), False),
]

TAGS = pa.schema(_pair + _factors + [("relation_rank", pa.int16(), False), ("tagger", pa.string(), False)])

TRIPLETS = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("subject_ann_id", pa.int64(), False),
        ("object_ann_id", pa.int64(), False),
        ("subject_category_id", pa.int32(), False),
        ("object_category_id", pa.int32(), False),
        ("subject_label", pa.string(), False),
        ("object_label", pa.string(), False),
        ("subject_box", _box, False),
        ("object_box", _box, False),
        ("relation", pa.string(), False),
        ("relation_lemma", pa.string(), False),
        ("confidence", pa.float32(), False),
        ("p_subject", pa.float32(), False),
        ("p_object", pa.float32(), False),
        ("p_relation", pa.float32(), False),
        ("relation_rank", pa.int16(), False),
        ("caption_ids", _ids, False),
        ("n_captions", pa.int16(), False),
        ("tagger", pa.string(), False),
        ("run_key", pa.string(), False),
        # addition (nullable): per caption_ids entry, the captions file's annotation id (null: generated caption)
        ("caption_source_ids", pa.list_(pa.int64()), True),
    ]
)

REJECTS = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("subject_ann_id", pa.int64(), False),
        ("object_ann_id", pa.int64(), False),
        ("subject_label", pa.string(), False),
        ("object_label", pa.string(), False),
        ("relation", pa.string(), False),
        ("confidence", pa.float32(), False),
        ("p_subject", pa.float32(), False),
        ("p_object", pa.float32(), False),
        ("p_relation", pa.float32(), False),
        ("caption_ids", _ids, False),
        ("reason", pa.string(), False),
        ("run_key", pa.string(), False),
    ]
)

QUARANTINE = pa.schema(
    [
        ("stage", pa.string(), False),
        ("image_id", pa.int64(), True),
        ("record", pa.string(), False),
        ("reason", pa.string(), False),
        ("detail", pa.string(), False),
        ("values", pa.string(), True),  # the record's values (JSON) where there is one
    ]
)

VERIFIED = pa.schema(
    [
        ("image_id", pa.int64(), False),
        ("file_name", pa.string(), False),
        ("width", pa.int32(), False),
        ("height", pa.int32(), False),
        ("format", pa.string(), False),
        ("mode", pa.string(), False),
        ("exif_orientation", pa.int16(), False),
        ("bytes", pa.int64(), False),
        ("sha256", pa.string(), False),
    ]
)

#: record type -> schema; the field names and order of each schema equal the dataclass's.
SCHEMAS: dict[type, pa.Schema] = {
    r.ImageRecord: IMAGES,
    r.Caption: CAPTIONS,
    r.ParsedRelation: PARSES,
    r.Candidate: CANDIDATES,
    r.RegionCaption: REGION_CAPTIONS,
    r.TaggedRelation: TAGS,
    r.Triplet: TRIPLETS,
    r.Reject: REJECTS,
    r.Quarantined: QUARANTINE,
    r.VerifiedImage: VERIFIED,
}


def to_table(rows: list, cls: type, schema: pa.Schema | None = None) -> pa.Table:
    """Records -> Arrow table with the record type's explicit schema (an empty list gives 0 rows); `schema`
    for a record type outside SCHEMAS (a stage that declares its own)."""
    schema = schema if schema is not None else SCHEMAS[cls]
    names = schema.names
    if cls is r.ImageRecord:
        cols = {n: [getattr(x, n) for x in rows] for n in names if n != "boxes"}
        cols["boxes"] = [[dataclasses.asdict(b) for b in x.boxes] for x in rows]
    else:
        cols = {n: [getattr(x, n) for x in rows] for n in names}
    return pa.Table.from_pydict(cols, schema=schema)


def from_table(table: pa.Table, cls: type) -> list:
    """Arrow table (of the record type's schema; for a type outside SCHEMAS, the table's own) -> records."""
    cols = table.select((SCHEMAS[cls] if cls in SCHEMAS else table.schema).names).to_pydict()
    n = table.num_rows
    if cls is r.ImageRecord:
        boxes = cols.pop("boxes")
        return [
            r.ImageRecord(**{k: v[i] for k, v in cols.items()}, boxes=[r.Box(**b) for b in boxes[i]])
            for i in range(n)
        ]
    return [cls(**{k: v[i] for k, v in cols.items()}) for i in range(n)]
