"""Reading relation triplets for pre-training: sources (runs, VG files), the VG reader, the streaming reader."""

from storage.relations.reader import RelationReader, iter_kept_rows
from storage.relations.records import ImageRelations, RelBox, RelRow
from storage.relations.sources import (
    RLIPV2_DATASET_NAME,
    RunNotFinished,
    RunSource,
    Source,
    VGSource,
    is_json_list,
    resolve_source,
)

__all__ = [
    "RLIPV2_DATASET_NAME",
    "ImageRelations",
    "RelBox",
    "RelRow",
    "RelationReader",
    "RunNotFinished",
    "RunSource",
    "Source",
    "VGSource",
    "is_json_list",
    "iter_kept_rows",
    "resolve_source",
]
