"""The reference tagger's class keys: the texts its subject/object heads score, in the reference's order.

Objects365: the keys of o365_obj_paraphrase.json in file order; the reference takes category id = position + 1
(`load_o365_categories`) and uses the keys verbatim (lower-case, typo-fixed names such as "basket" for the
raw label "Bakset"). COCO: the 80 names of coco_object_names.json (COCO category id order, `hico_object_names`
in the reference), mapped by category id.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Literal


def _read(name: str):
    return json.loads(resources.files("models.data.synonyms").joinpath(name).read_text(encoding="utf-8"))


@cache
def _table(vocabulary: str) -> tuple[tuple[str, ...], dict[int, str]]:
    if vocabulary == "o365":
        keys = tuple(_read("o365_obj_paraphrase.json"))
        return keys, {i + 1: k for i, k in enumerate(keys)}
    if vocabulary == "coco":
        names = _read("coco_object_names.json")
        keys = tuple(names)
        return keys, {int(cid): k for k, cid in names.items()}
    raise ValueError(f"vocabulary {vocabulary!r} is not one of ['coco', 'o365']")


def class_keys(vocabulary: Literal["o365", "coco"]) -> list[str]:
    """The class keys in the reference's order (365 or 80), without 'no objects'."""
    return list(_table(vocabulary)[0])


def key_for_category(vocabulary: Literal["o365", "coco"], category_id: int) -> str:
    """The class key of a dataset category id; a clear error for ids outside the vocabulary."""
    by_id = _table(vocabulary)[1]
    if category_id not in by_id:
        raise ValueError(
            f"category id {category_id} has no class key in the {vocabulary} vocabulary "
            f"(ids {min(by_id)}..{max(by_id)})"
        )
    return by_id[category_id]
