"""Synthetic Objects365-like detection files and captions for benchmarks (written streaming, any size)."""

from __future__ import annotations

import json
import random

O365_NAMES = [
    "Person",
    "Chair",
    "Car",
    "Cup",
    "Bottle",
    "Desk",
    "Handbag/Satchel",
    "Plate",
    "Helmet",
    "Book",
    "Bench",
    "Bowl",
    "Flag",
    "Pillow",
    "Boots",
    "Umbrella",
    "Dog",
    "Cat",
    "Horse",
    "Bicycle",
    "Tie",
    "Spoon",
    "Knife",
]


#: Words of the class phrases and relation texts of the model benchmarks (bench_tagger, bench_pretrain): 20 bare
#: nouns and 400 "adjective noun" phrases, as many distinct texts as a large vocabulary has.
PHRASE_ADJ = ["red", "small", "wooden", "plastic", "glass", "metal", "paper", "leather", "baby", "traffic", "street",
              "tennis", "soccer", "coffee", "dining", "cell", "wine", "flower", "hot", "fire"]  # fmt: skip
PHRASE_NOUN = ["cup", "chair", "table", "bottle", "lamp", "sign", "light", "racket", "ball", "phone", "glass", "pot",
               "truck", "bag", "hat", "boot", "bowl", "plate", "box", "pen"]  # fmt: skip
RELATION_TEXTS = ["on", "next to", "holding", "riding", "sitting on", "in front of", "behind", "wearing", "near",
                  "looking at", "carrying", "under", "above", "standing on", "in"]  # fmt: skip


def class_phrases() -> list[str]:
    """The 20 nouns, then every "adjective noun" (420 texts)."""
    return PHRASE_NOUN + [f"{a} {n}" for a in PHRASE_ADJ for n in PHRASE_NOUN]


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
            f.write(
                json.dumps(
                    {
                        "height": 512,
                        "id": i + 1,
                        "license": 5,
                        "width": 683,
                        "file_name": f"images/v1/patch{i % 16}/objects365_v1_{i + 1:08d}.jpg",
                    }
                )
            )
        f.write('], "annotations": [')
        for i in range(n_images):
            for _ in range(boxes_per_image):
                x, y = rng.uniform(0, 600), rng.uniform(0, 450)
                w, h = rng.uniform(5, 80), rng.uniform(5, 60)
                if n_ann:
                    f.write(",")
                n_ann += 1
                f.write(
                    json.dumps(
                        {
                            "id": n_ann,
                            "iscrowd": 0,
                            "isfake": 0,
                            "area": w * h,
                            "isreflected": 0,
                            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                            "image_id": i + 1,
                            "category_id": rng.choice(ids),
                        }
                    )
                )
        f.write('], "categories": ')
        f.write(json.dumps(cats))
        f.write(', "licenses": []}')
    return {"images": n_images, "annotations": n_ann}


# (O365 category name, caption words for it)
_SCENE_CLASSES = [
    ("Person", ["man", "woman", "person", "boy", "girl"]),
    ("Chair", ["chair"]),
    ("Cup", ["cup"]),
    ("Dog", ["dog"]),
    ("Car", ["car"]),
    ("Bench", ["bench"]),
    ("Horse", ["horse"]),
    ("Umbrella", ["umbrella"]),
    ("Bottle", ["bottle"]),
    ("Bicycle", ["bicycle", "bike"]),
    ("Dinning Table", ["table"]),
]
_RELATIONS = [
    "sitting on",
    "holding",
    "next to",
    "riding",
    "standing near",
    "on top of",
    "in front of",
    "looking at",
]
_ADJ = ["", "", "small ", "red ", "old ", "white ", "wooden ", "large "]


def write_dataset(folder: str, n_images: int, captions_per_image: int = 5, seed: int = 0) -> dict:
    """A small labelled dataset with relation-bearing captions: detections.json + captions.json (oracle) and
    the images (img/*.jpg, 640x480) under `folder`, which is the image root (returned as "images_root").

    Boxes are placed so that some pairs overlap and some do not; captions name classes present in the image.
    """
    import os

    rng = random.Random(seed)
    cats = categories()
    by_name = {c["name"]: c["id"] for c in cats}
    images, anns, caps = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"img/{i:07d}.jpg", "width": 640, "height": 480})
        present = rng.sample(_SCENE_CLASSES, k=rng.randint(2, 4))
        for name, _ in present:
            for _ in range(rng.randint(1, 2)):
                x, y = rng.uniform(0, 500), rng.uniform(0, 380)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": by_name[name],
                        "iscrowd": 0,
                        "bbox": [
                            round(x, 1),
                            round(y, 1),
                            round(rng.uniform(20, 140), 1),
                            round(rng.uniform(20, 100), 1),
                        ],
                    }
                )
        for _ in range(captions_per_image):
            (_, sw), (_, ow) = rng.sample(present, k=2)
            text = f"A {rng.choice(_ADJ)}{rng.choice(sw)} {rng.choice(_RELATIONS)} a {rng.choice(_ADJ)}{rng.choice(ow)}."
            caps.append({"id": len(caps) + 1, "image_id": i, "caption": text.replace("  ", " ")})
    os.makedirs(folder, exist_ok=True)
    # the images themselves (every run decodes them in its verify stage): one small grey 640x480 JPEG's bytes
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (128, 128, 128)).save(buf, format="JPEG", quality=50)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for im in images:
        with open(os.path.join(folder, im["file_name"]), "wb") as f:
            f.write(buf.getvalue())
    det, cap = os.path.join(folder, "detections.json"), os.path.join(folder, "captions.json")
    with open(det, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    with open(cap, "w") as f:
        json.dump({"annotations": caps}, f)
    return {
        "detections": det,
        "captions": cap,
        "images_root": folder,
        "images": n_images,
        "boxes": len(anns),
        "captions_n": len(caps),
    }
