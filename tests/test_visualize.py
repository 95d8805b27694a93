"""`reltag show` pictures: a TrueType font that keeps spaces, opaque label boxes on any photo, arrows sharing a
box that stay visible in their own colours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from storage.records import Box, ImageRecord, Triplet
from tasks.audit.visualize import LABEL_BG, PALETTE, draw_label, draw_triplets, label_font


def _ink_width(text: str, font) -> int:
    """Width in pixels of the ink of `text` drawn black on white (first to last non-white column)."""
    img = Image.new("L", (1200, 40), 255)
    ImageDraw.Draw(img).text((10, 5), text, fill=0, font=font)
    cols = np.flatnonzero((np.asarray(img) < 128).any(axis=0))
    return int(cols[-1] - cols[0] + 1)


def test_spaces_keep_their_width():
    font = label_font(13)
    space = font.getlength(" ")
    assert space >= 3  # DejaVu Sans at 13 px: a space is about 4 px wide
    with_spaces = _ink_width("stop sign [in front of] truck", font)
    without = _ink_width("stopsign[infrontof]truck", font)
    # five spaces: the ink widens by five space advances (kerning may move a glyph by a pixel)
    assert with_spaces - without == pytest.approx(5 * space, abs=3)
    assert with_spaces - without >= 4 * space


def _photo(colour) -> Image.Image:
    return Image.new("RGB", (200, 120), colour)


@pytest.mark.parametrize("photo", [(255, 255, 255), (0, 0, 0)], ids=["white", "black"])
def test_label_background_is_opaque_on_any_photo(photo):
    img = _photo(photo)
    d = ImageDraw.Draw(img)
    font = label_font(13)
    x0, y0, x1, y1 = draw_label(d, (20, 30), "dining table", font)
    a = np.asarray(img)[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
    is_bg = (a == LABEL_BG).all(axis=1)
    is_text = a.min(axis=1) > LABEL_BG[0]  # white text and its anti-aliased edges, lighter than the box
    assert (is_bg | is_text).all(), "a photo pixel shows through the label box"
    assert is_bg.mean() > 0.5 and is_text.any()
    # the photo around the box is untouched
    assert tuple(np.asarray(img)[y1 + 2, x0]) == photo


def _trip(s, o, rel, conf, sb, ob) -> Triplet:
    return Triplet(7, s, o, 1, 2, "person", "horse", list(sb), list(ob), rel, rel, conf, 1.0, 1.0, conf, 1,
                   [0], 1, "greedy_overlap", "k")  # fmt: skip


def _columns_with(out: np.ndarray, k: int) -> int:
    """Columns of the gap between the two boxes (x 60..140, above the legend) showing arrow k's colour."""
    gap = out[:120, 60:140]
    return int((gap == PALETTE[k]).all(axis=2).any(axis=0).sum())


@pytest.mark.parametrize("photo", [(255, 255, 255), (0, 0, 0)], ids=["white", "black"])
def test_two_arrows_of_one_pair_are_both_visible(photo):
    sb, ob = (10, 40, 40, 40), (150, 40, 40, 40)  # side by side: the arrows cross the gap x in 50..150
    rec = ImageRecord(7, "x.png", 200, 120, 0, [Box(1, 1, "person", *sb), Box(2, 2, "horse", *ob)])
    trips = [_trip(1, 2, "riding", 0.9, sb, ob), _trip(1, 2, "next to", 0.8, sb, ob)]
    out = np.asarray(draw_triplets(_photo(photo), rec, trips))
    assert PALETTE[0] != PALETTE[1]
    # each arrow is a line across the gap: both colours show in most columns (the other arrow's number covers some), not just at the numbers
    assert min(_columns_with(out, k) for k in range(2)) >= 0.7 * 80


def test_arrows_in_opposite_directions_do_not_share_a_line():
    sb, ob = (10, 40, 40, 40), (150, 40, 40, 40)
    rec = ImageRecord(7, "x.png", 200, 120, 0, [Box(1, 1, "person", *sb), Box(2, 2, "horse", *ob)])
    trips = [_trip(1, 2, "feeding", 0.9, sb, ob), _trip(2, 1, "looking at", 0.8, ob, sb)]
    out = np.asarray(draw_triplets(_photo((255, 255, 255)), rec, trips))
    assert min(_columns_with(out, k) for k in range(2)) >= 0.7 * 80


def test_legend_lists_each_triplet_with_its_spaces_and_is_not_clipped():
    sb, ob = (10, 40, 40, 40), (150, 40, 40, 40)
    rec = ImageRecord(7, "x.png", 200, 120, 0, [Box(1, 1, "stop sign", *sb), Box(2, 2, "truck", *ob)])
    t = _trip(1, 2, "in front of", 0.5, sb, ob)
    t.subject_label, t.object_label = "stop sign", "truck"
    out = draw_triplets(_photo((255, 255, 255)), rec, [t])
    font = label_font(13)
    # the legend line is wider than the 200 px photo: the canvas grows to hold it
    assert out.width >= font.getlength("1  stop sign [in front of] truck  (0.50)") + 22
