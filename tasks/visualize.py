"""Pictures for audits: an image with its accepted triplets drawn on it (boxes, arrows, relation labels)."""

from __future__ import annotations

import colorsys
import math

from PIL import Image, ImageDraw, ImageFont

from storage.records import ImageRecord, Triplet


def _colour(k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((k * 0.61803398875) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_triplets(
    image: Image.Image, record: ImageRecord, triplets: list[Triplet], max_triplets: int = 12
) -> Image.Image:
    """Boxes of every annotated object (thin, grey), the pairs of the top triplets (coloured, subject -> object
    arrow) and a legend "subject relation object (confidence)" under the picture."""
    img = image.convert("RGB")
    scale = 640 / max(img.size) if max(img.size) > 640 else 1.0
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)))
    font = ImageFont.load_default()
    shown = sorted(triplets, key=lambda t: (-t.confidence, t.subject_ann_id, t.object_ann_id, t.relation))[
        :max_triplets
    ]
    line_h = 14
    canvas = Image.new("RGB", (img.width, img.height + line_h * (len(shown) + 1) + 6), "white")
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)

    def rect(b):
        x, y, w, h = (v * scale for v in b)
        return [x, y, x + w, y + h]

    for b in record.boxes:
        d.rectangle(rect((b.x, b.y, b.w, b.h)), outline=(160, 160, 160), width=1)
        x0, y0, _, _ = rect((b.x, b.y, b.w, b.h))
        d.text((x0 + 2, y0 + 1), b.label, fill=(200, 200, 200), font=font)
    for k, t in enumerate(shown):
        c = _colour(k)
        s, o = rect(t.subject_box), rect(t.object_box)
        d.rectangle(s, outline=c, width=3)
        d.rectangle(o, outline=c, width=2)
        (sx, sy), (ox, oy) = ((s[0] + s[2]) / 2, (s[1] + s[3]) / 2), ((o[0] + o[2]) / 2, (o[1] + o[3]) / 2)
        d.line([sx, sy, ox, oy], fill=c, width=2)
        ang = math.atan2(oy - sy, ox - sx)
        for da in (2.6, -2.6):
            d.line([ox, oy, ox + 9 * math.cos(ang + da), oy + 9 * math.sin(ang + da)], fill=c, width=2)
        d.text(
            (4, img.height + 4 + line_h * k),
            f"{t.subject_label} [{t.relation}] {t.object_label}  ({t.confidence:.2f})",
            fill=c,
            font=font,
        )
    footer = f"image {record.image_id}: {len(triplets)} triplets, {len(record.boxes)} boxes"
    d.text((4, img.height + 4 + line_h * len(shown)), footer, fill=(0, 0, 0), font=font)
    return canvas


def contact_sheet(tiles: list[Image.Image], columns: int = 3) -> Image.Image:
    """Tiles in a grid, each cell the size of the largest tile."""
    if not tiles:
        raise ValueError("contact_sheet needs at least one picture")
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (w * min(columns, len(tiles)), h * rows), "white")
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % columns) * w, (k // columns) * h))
    return sheet
