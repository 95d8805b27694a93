"""Oracle captions: human captions from a COCO-Captions-format JSON (paper Tables 5, 6, 14)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import fsspec


class OracleCaptioner:
    """Reads `{"annotations": [{"image_id", "caption", "id"}, ...]}`; captions keep the file's order and
    their annotation ids (`source_ids`), so triplets join back to the file."""

    needs_pixels = False

    def __init__(self, path: str):
        with fsspec.open(path, "rb") as f:
            blob = f.read()
        self.revision = hashlib.sha256(blob).hexdigest()[:16]
        self.name = "oracle"
        try:
            doc = json.loads(blob)
        except json.JSONDecodeError as e:
            raise ValueError(f"captions file {path} is not valid JSON: {e}") from e
        anns = doc.get("annotations") if isinstance(doc, dict) else None
        if not isinstance(anns, list):
            raise ValueError(
                f"captions file {path} has no 'annotations' list (COCO-Captions format expected)"
            )
        self._by_image: dict[int, list[str]] = defaultdict(list)
        self._ids: dict[int, list[int | None]] = defaultdict(list)  # the annotations' own ids, same order
        for i, a in enumerate(anns):
            if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
                raise ValueError(
                    f"captions file {path}: annotation #{i} lacks image_id or caption: {a!r:.200}"
                )
            if not isinstance(a["caption"], str):
                raise ValueError(
                    f"captions file {path}: annotation #{i} (image {a['image_id']}) caption is "
                    f"{type(a['caption']).__name__}, not a string"
                )
            cid = a.get("id")
            if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)):
                raise ValueError(
                    f"captions file {path}: annotation #{i} (image {a['image_id']}) has id {cid!r}, not an integer"
                )
            self._by_image[int(a["image_id"])].append(a["caption"])
            self._ids[int(a["image_id"])].append(cid)

    def sampling(self) -> dict:
        return {"mode": "oracle"}

    def caption(self, images, pixels, seed):
        return [list(self._by_image.get(im.image_id, [])) for im in images]

    def source_ids(self, images) -> list[list[int | None]]:
        """Per image, the captions file's annotation ids of the captions `caption` returns (None: no id)."""
        return [list(self._ids.get(im.image_id, [])) for im in images]
