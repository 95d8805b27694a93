"""Caption stage: run the configured captioners over a batch of images, de-duplicate per image."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from models.captioners.base import Captioner
from storage.records import Caption, ImageRecord, Quarantined


@dataclass(slots=True)
class CaptionOutput:
    captions: list[Caption]
    quarantine: list[Quarantined] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .")


def caption_batch(images: list[ImageRecord], captioners: list[Captioner], image_root: str | None, seed: int) -> CaptionOutput:
    """Captions for every image, numbered 0.. per image across captioners, duplicates flagged.

    Args:
        images: the batch.
        captioners: run in order; their captions are concatenated per image.
        image_root: folder the images' file names are relative to (only read when a captioner needs pixels).
        seed: the batch's sampling seed (derived from the run key and the batch id by the caller).
    """
    per_image: list[list[tuple[str, Captioner]]] = [[] for _ in images]
    for cap in captioners:
        if cap.needs_pixels:
            raise NotImplementedError("pixel captioners are wired in by the captioning issue")
        texts = cap.caption(images, [None] * len(images), seed)
        for i, t in enumerate(texts):
            per_image[i].extend((x, cap) for x in t)
    rows: list[Caption] = []
    n_unique = []
    for im, caps in zip(images, per_image):
        seen: set[str] = set()
        for k, (text, cap) in enumerate(caps):
            key = _norm(text)
            rows.append(
                Caption(im.image_id, k, text, key in seen, cap.name, cap.revision, json.dumps(cap.sampling(), sort_keys=True))
            )
            seen.add(key)
        n_unique.append(len(seen))
    stats = {
        "images": len(images),
        "captions": len(rows),
        "unique_captions": sum(n_unique),
        "images_without_captions": sum(1 for u in n_unique if u == 0),
    }
    return CaptionOutput(rows, [], stats)
