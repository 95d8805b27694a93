"""Draw the tiny VG-style training sample (4 images, PIL shapes) and write relationships.json.

Run from the repo root: python examples/vg_tiny/make_vg_tiny.py  (deterministic; the outputs are committed).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLORS = {"person": (220, 60, 60), "horse": (140, 90, 40), "table": (90, 60, 30), "cup": (240, 240, 250),
          "dog": (200, 170, 90), "ball": (40, 140, 230), "tree": (30, 150, 40), "car": (60, 60, 200)}  # fmt: skip

SCENES = [
    # (objects: name, x, y, w, h), (relationships: subject index, predicate, object index)
    ([("person", 70, 20, 40, 60), ("horse", 40, 60, 110, 50), ("tree", 150, 10, 40, 100)],
     [(0, "riding on", 1), (1, "next to", 2), (0, "in front of", 2)]),
    ([("table", 30, 70, 130, 40), ("cup", 60, 50, 20, 20), ("person", 120, 10, 40, 90)],
     [(1, "on", 0), (2, "holding", 1), (2, "next to", 0)]),
    ([("dog", 20, 60, 70, 40), ("ball", 110, 80, 25, 25), ("person", 140, 15, 35, 90)],
     [(0, "playing with", 1), (2, "next to", 1), (0, "looking at", 2)]),
    ([("car", 20, 50, 100, 50), ("person", 130, 20, 35, 85), ("tree", 5, 5, 40, 45)],
     [(1, "next to", 0), (0, "in front of", 2), (1, "looking at", 0)]),
]  # fmt: skip


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    records = []
    oid = 1
    for i, (objs, rels) in enumerate(SCENES):
        img = Image.new("RGB", (200, 120), (200, 220, 235))
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, 100, 199, 119], fill=(110, 170, 90))  # ground
        ids = []
        out_objs = []
        for name, x, y, w, h in objs:
            if name in ("ball", "cup"):
                draw.ellipse([x, y, x + w - 1, y + h - 1], fill=COLORS[name], outline=(0, 0, 0))
            else:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLORS[name], outline=(0, 0, 0))
            out_objs.append({"object_id": oid, "name": name, "x": x, "y": y, "w": w, "h": h})
            ids.append(oid)
            oid += 1
        name = f"images/vg_tiny_{i:02d}.png"
        img.save(HERE / name)
        records.append({
            "image_id": 1000 + i, "file_name": name, "width": 200, "height": 120, "objects": out_objs,
            "relationships": [{"subject_id": ids[s], "object_id": ids[o], "predicate": p} for s, p, o in rels],
        })  # fmt: skip
    (HERE / "relationships.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
