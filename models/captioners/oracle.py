"""Oracle captions: human captions from a COCO-Captions-format JSON (paper Tables 5, 6, 14)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import fsspec


class OracleCaptioner:
    """Reads `{"annotations": [{"image_id", "caption"}, ...]}`; captions keep the file's order."""

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
            self._by_image[int(a["image_id"])].append(a["caption"])

    def sampling(self) -> dict:
        return {"mode": "oracle"}

    def caption(self, images, pixels, seed):
        return [list(self._by_image.get(im.image_id, [])) for im in images]
