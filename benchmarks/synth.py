"""Synthetic Objects365-like detection files and captions for benchmarks (written streaming, any size)."""

from __future__ import annotations

import json
import random

O365_NAMES = [
    "Person", "Chair", "Car", "Cup", "Bottle", "Desk", "Handbag/Satchel", "Plate", "Helmet", "Book", "Bench",
    "Bowl", "Flag", "Pillow", "Boots", "Umbrella", "Dog", "Cat", "Horse", "Bicycle", "Tie", "Spoon", "Knife",
]


def categories() -> list[dict]:
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "sample_detections.json")
    with open(path) as f:
        return json.load(f)["categories"]


def write_detections(path: str, n_images: int, boxes_per_image: int = 9, seed: int = 0) -> dict:
    """Write an Objects365-shaped JSON (images, annotations, categories) without holding it in memory."""
    rng = random.Random(seed)
    cats = categories()
    ids = [c["id"] for c in cats]
    n_ann = 0
    with open(path, "w") as f:
        f.write('{"images": [')
        for i in range(n_images):
            if i:
                f.write(",")
            f.write(json.dumps({"height": 512, "id": i + 1, "license": 5, "width": 683,
                                "file_name": f"images/v1/patch{i % 16}/objects365_v1_{i + 1:08d}.jpg"}))
        f.write('], "annotations": [')
        for i in range(n_images):
            for _ in range(boxes_per_image):
                x, y = rng.uniform(0, 600), rng.uniform(0, 450)
                w, h = rng.uniform(5, 80), rng.uniform(5, 60)
                if n_ann:
                    f.write(",")
                n_ann += 1
                f.write(json.dumps({"id": n_ann, "iscrowd": 0, "isfake": 0, "area": w * h, "isreflected": 0,
                                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                    "image_id": i + 1, "category_id": rng.choice(ids)}))
        f.write('], "categories": ')
        f.write(json.dumps(cats))
        f.write(', "licenses": []}')
    return {"images": n_images, "annotations": n_ann}
