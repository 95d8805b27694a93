"""Broken and odd image files for the plan, verify and security tests (written by hand, nothing allocated big)."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def noise_jpeg(w: int, h: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A JPEG of random pixels (so that a cut file really lacks entropy-coded data)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h pixels (8-bit RGB), with one empty IDAT and IEND: a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(w: int, h: int, orientation: int = 6) -> bytes:
    """A JPEG stored w x h with an EXIF orientation tag (6: displayed rotated 90 degrees clockwise)."""
    im = Image.new("RGB", (w, h), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def png16(w: int, h: int) -> bytes:
    arr = np.arange(w * h, dtype=np.uint16).reshape(h, w) * 97
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def palette_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        buf, format="PNG"
    )
    return buf.getvalue()


#: name -> (annotated width, height, expected quarantine reason or None, stage that quarantines it)
CASES = {
    "good_a.jpg": (64, 48, None, None),
    "good_b.jpg": (64, 48, None, None),
    "cmyk.jpg": (64, 48, None, None),
    "palette.png": (64, 48, None, None),
    "grey16.png": (64, 48, None, None),
    "exif6.jpg": (64, 48, None, None),
    "missing.jpg": (64, 48, "missing_file", "plan"),
    "link_out.jpg": (64, 48, "unsafe_path", "plan"),
    "cut_third.jpg": (64, 48, "decode_error", "verify"),
    "cut_40.jpg": (64, 48, "decode_error", "plan"),
    "huge.png": (40_000, 40_000, "too_large", "plan"),
    "small.jpg": (120, 80, "size_mismatch", "plan"),
}


def write_cases(root: str) -> dict:
    """Write every case of CASES under `root` (a symlink leaves it for `root`/../outside.jpg); returns CASES."""
    os.makedirs(root, exist_ok=True)
    full = noise_jpeg(64, 48, seed=1)
    files = {
        "good_a.jpg": full,
        "good_b.jpg": noise_jpeg(64, 48, seed=2),
        "cmyk.jpg": noise_jpeg(64, 48, seed=3, mode="CMYK"),
        "palette.png": palette_png(64, 48),
        "grey16.png": png16(64, 48),
        "exif6.jpg": exif_rotated_jpeg(64, 48),
        "cut_third.jpg": full[: len(full) // 3],
        "cut_40.jpg": full[:40],
        "huge.png": png_header(40_000, 40_000),
        "small.jpg": noise_jpeg(60, 40, seed=4),
    }
    for name, blob in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(blob)
    outside = os.path.join(os.path.dirname(os.path.abspath(root)), "outside.jpg")
    with open(outside, "wb") as f:
        f.write(noise_jpeg(64, 48, seed=5))
    os.symlink(outside, os.path.join(root, "link_out.jpg"))
    return CASES
