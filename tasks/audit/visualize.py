"""Pictures for audits: an image with its accepted triplets drawn on it (boxes, arrows, relation labels)."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from storage.records import ImageRecord, Triplet

#: Twelve colours far apart in hue and lightness (each readable as a 3 px line on a photo); a triplet's colour is
#: PALETTE[k % 12], k its position among the drawn triplets, so up to 12 arrows of one picture all differ.
PALETTE = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (128, 0, 0),  # maroon
    (0, 0, 128),  # navy
    (255, 225, 25),  # yellow
    (0, 128, 128),  # teal
)
#: Label boxes: opaque dark background, white text, so a label reads the same on a bright and a dark photo.
LABEL_BG = (24, 24, 24)
LABEL_FG = (255, 255, 255)
BOX_GREY = (200, 200, 200)


def _colour(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


def _font_path() -> Path:
    """DejaVu Sans as bundled with matplotlib (mpl-data/fonts/ttf): no system font and no network needed."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise ValueError(
            "drawing triplets needs matplotlib's bundled DejaVu Sans font; install the report extra "
            "(pip install 'reltag[report]')"
        )
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():
        raise ValueError(f"matplotlib is installed but its DejaVu Sans font is missing at {path}")
    return path


@functools.lru_cache(maxsize=8)
def label_font(size: int = 13) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at `size` pixels (a TrueType font: spaces keep their width, unlike PIL's bitmap default)."""
    return ImageFont.truetype(str(_font_path()), size)


def draw_label(
    d: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont,
    fg: tuple[int, int, int] = LABEL_FG,
    bg: tuple[int, int, int] = LABEL_BG,
    pad: int = 2,
) -> tuple[int, int, int, int]:
    """Text on an opaque background box whose top-left corner is at xy; returns the box (x0, y0, x1, y1)."""
    x, y = round(xy[0]), round(xy[1])
    ascent, descent = font.getmetrics()
    w = math.ceil(font.getlength(text))
    box = (x, y, x + w + 2 * pad, y + ascent + descent + 2 * pad)
    d.rectangle(box, fill=bg)
    d.text((x + pad, y + pad), text, fill=fg, font=font)
    return box


def _text_on(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with bg (ITU-R BT.601 luma)."""
    return (0, 0, 0) if 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] > 140 else (255, 255, 255)


def _arrow_lines(triplets: list[Triplet], rect, step: float = 5.0) -> list[tuple[float, float, float, float]]:
    """Start and end point of each triplet's subject -> object arrow, from box centre to box centre, shifted
    sideways so that arrows sharing a box do not cover each other.

    Every box hands each arrow touching it its own slot (in drawing order); an arrow's end in that box is moved
    by (slot - (n - 1) / 2) * step pixels along the normal of the pair's canonical direction (lower ann id to
    higher, so that A->B and B->A get opposite sides, not the same line). Arrows of one pair with several
    relations therefore run parallel, `step` apart.
    """
    touching: dict[tuple[int, int], list[int]] = {}
    for k, t in enumerate(triplets):
        for ann in (t.subject_ann_id, t.object_ann_id):
            touching.setdefault((t.image_id, ann), []).append(k)
    lines = []
    for k, t in enumerate(triplets):
        s, o = rect(t.subject_box), rect(t.object_box)
        sc = ((s[0] + s[2]) / 2, (s[1] + s[3]) / 2)
        oc = ((o[0] + o[2]) / 2, (o[1] + o[3]) / 2)
        a, b = (sc, oc) if t.subject_ann_id <= t.object_ann_id else (oc, sc)
        length = math.hypot(b[0] - a[0], b[1] - a[1]) or 1.0
        nx, ny = -(b[1] - a[1]) / length, (b[0] - a[0]) / length  # unit normal of the canonical direction
        if a == b:
            nx, ny = 1.0, 0.0
        ends = []
        for centre, ann in ((sc, t.subject_ann_id), (oc, t.object_ann_id)):
            slots = touching[(t.image_id, ann)]
            off = (slots.index(k) - (len(slots) - 1) / 2) * step
            ends.append((centre[0] + nx * off, centre[1] + ny * off))
        lines.append((*ends[0], *ends[1]))
    return lines


def draw_triplets(
    image: Image.Image,
    record: ImageRecord,
    triplets: list[Triplet],
    max_triplets: int = 12,
    max_side: int = 640,
    font_size: int = 13,
) -> Image.Image:
    """Boxes of every annotated object (grey, with their class on an opaque label), the pairs of the top triplets
    (a colour each: subject -> object arrow with its number) and a legend "n  subject [relation] object
    (confidence)" under the picture.

    Args:
        image: the photo (any mode; drawn as RGB).
        record: its planned image record (boxes in pixels of the original size).
        triplets: the image's triplets; the `max_triplets` most confident are drawn (ties by ids and text).
        max_side: the photo is scaled down so that its longer side is at most this many pixels.
    """
    img = image.convert("RGB")
    scale = max_side / max(img.size) if max(img.size) > max_side else 1.0
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)))
    font = label_font(font_size)
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + 6
    shown = sorted(triplets, key=lambda t: (-t.confidence, t.subject_ann_id, t.object_ann_id, t.relation))[
        :max_triplets
    ]
    footer = f"image {record.image_id}: {len(triplets)} triplets, {len(record.boxes)} boxes"
    legend = [
        f"{k + 1}  {t.subject_label} [{t.relation}] {t.object_label}  ({t.confidence:.2f})"
        for k, t in enumerate(shown)
    ]
    width = max([img.width] + [math.ceil(font.getlength(s)) + 24 for s in legend + [footer]])
    canvas = Image.new("RGB", (width, img.height + line_h * (len(shown) + 1) + 6), "white")
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)

    def rect(b):
        x, y, w, h = (v * scale for v in b)
        return [x, y, x + w, y + h]

    in_triplet = {a for t in shown for a in (t.subject_ann_id, t.object_ann_id)}
    for b in record.boxes:  # every box thin and grey, under the coloured ones
        r = rect((b.x, b.y, b.w, b.h))
        d.rectangle(r, outline=(0, 0, 0), width=3)  # dark halo: the grey line reads on a bright photo too
        d.rectangle(r, outline=BOX_GREY, width=1)
    colour_of_box: dict[int, tuple[int, int, int]] = {}
    for k, t in enumerate(shown):
        colour_of_box.setdefault(t.subject_ann_id, _colour(k))
        colour_of_box.setdefault(t.object_ann_id, _colour(k))
    for b in record.boxes:
        if b.ann_id in colour_of_box:
            d.rectangle(rect((b.x, b.y, b.w, b.h)), outline=colour_of_box[b.ann_id], width=2)
    lines = _arrow_lines(shown, rect)
    for k, (sx, sy, ox, oy) in enumerate(lines):
        c = _colour(k)
        d.line([sx, sy, ox, oy], fill=c, width=3)
        ang = math.atan2(oy - sy, ox - sx)
        head = [(ox, oy)] + [
            (ox + 11 * math.cos(ang + da), oy + 11 * math.sin(ang + da)) for da in (2.7, -2.7)
        ]
        d.polygon(head, fill=c)
    # the arrows' numbers, on a background of the arrow's colour; a pair's arrows put theirs at different points
    pair_seen: dict[tuple[int, int], int] = {}
    pair_n: dict[tuple[int, int], int] = {}
    for t in shown:
        key = tuple(sorted((t.subject_ann_id, t.object_ann_id)))
        pair_n[key] = pair_n.get(key, 0) + 1
    for k, (t, (sx, sy, ox, oy)) in enumerate(zip(shown, lines)):
        key = tuple(sorted((t.subject_ann_id, t.object_ann_id)))
        i = pair_seen.get(key, 0)
        pair_seen[key] = i + 1
        f = (i + 1) / (pair_n[key] + 1)
        c = _colour(k)
        num = str(k + 1)
        w = font.getlength(num) + 4
        draw_label(
            d, (sx + (ox - sx) * f - w / 2, sy + (oy - sy) * f - line_h / 2), num, font, _text_on(c), c
        )
    placed: list[tuple[float, float, float, float]] = []
    for (
        b
    ) in record.boxes:  # class labels last: never covered by a line; moved down past labels already placed
        if b.ann_id in in_triplet or len(record.boxes) <= 8:
            x0, y0, _, _ = rect((b.x, b.y, b.w, b.h))
            w, h = font.getlength(b.label) + 4, ascent + descent + 4
            x, y = x0 + 1, y0 + 1
            for _ in range(len(placed)):
                hit = [p for p in placed if x < p[2] and p[0] < x + w and y < p[3] and p[1] < y + h]
                if not hit:
                    break
                y = max(p[3] for p in hit) + 1
            placed.append(draw_label(d, (x, y), b.label, font))
    for k, s in enumerate(legend):
        y = img.height + 4 + line_h * k
        d.rectangle([4, y + 2, 16, y + line_h - 4], fill=_colour(k))
        d.text((22, y + 1), s, fill=(0, 0, 0), font=font)
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
