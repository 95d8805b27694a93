"""Image access shared by planning, verification, captioning and tagging: safe paths, cheap header checks,
full decoding with odd modes converted to RGB, bad files quarantined with the reason.

Reasons (the `reason` column of a quarantine row): unsafe_file_name (the name itself: '..', absolute, a URL
scheme, NUL), unsafe_path (the name resolves, through symlinks, outside the image root), missing_file,
read_error, file_too_large (bytes), too_large (pixels), decode_error (the header or the pixel data does not
decode; the detail carries the decoder's message), size_mismatch (decoded size != annotated width x height),
unsupported_mode.

EXIF orientation is read and reported, never applied: COCO and Objects365 boxes refer to the stored pixel grid
(what PIL decodes without `ImageOps.exif_transpose`), so rotating the pixels would move them off their boxes.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from storage.paths import outside_root, unsafe_name
from storage.records import ImageRecord, Quarantined
from storage.retry import retrying

#: Files larger than this are not read at all (a detection image is a few MB; 256 MiB is a broken file).
MAX_BYTES = 256 * 1024 * 1024
#: PIL's own decompression-bomb warning threshold (about 9459 x 9459 pixels); bigger images are quarantined.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
#: Above twice its limit PIL refuses to open an image at all (DecompressionBombError): our limit's ceiling.
PIXEL_CEILING = 2 * MAX_PIXELS
#: Block size for header reads on object storage: one ranged read covers the header of JPEG/PNG/WebP files.
HEADER_BLOCK = 64 * 1024
#: EXIF tag of the orientation (1 = as stored; 2..8 = flipped and/or rotated for display).
EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """An image that cannot be used, with the quarantine reason and a detail naming the offending values."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_uri(path: str) -> bool:
    return "://" in path


def _quarantine(stage: str, record: ImageRecord, reason: str, detail: str) -> tuple[None, Quarantined]:
    return None, quarantine_row(stage, record, reason, detail)


def quarantine_row(stage: str, record: ImageRecord, reason: str, detail: str) -> Quarantined:
    """A quarantine row for an image: the file name as the record, its planned values as JSON."""
    import json

    values = json.dumps(
        {"id": record.image_id, "file_name": record.file_name, "width": record.width, "height": record.height}
    )
    return Quarantined(
        stage, record.image_id, record.file_name, reason, f"{record.file_name}: {detail}", values
    )


def _local_root(image_root: str) -> str | None:
    """The local folder of a root (plain path or file://), or None for object storage."""
    if image_root.startswith("file://"):
        return image_root[len("file://") :]
    return None if _is_uri(image_root) else image_root


def _local_path(root: str, file_name: str) -> str:
    """The resolved path of a file under a local root; BadImage when it leaves the root or is no file."""
    path = os.path.join(root, file_name)
    real = outside_root(root, file_name)
    if real is not None:
        raise BadImage(
            "unsafe_path", f"resolves to {real}, outside the image root {os.path.realpath(root)} (symlink?)"
        )
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise BadImage("missing_file", f"{path} does not exist or is not a file")
    return real


def _open_file(image_root: str, file_name: str, max_bytes: int, block_size: int | None = None):
    """(binary file object, size in bytes) of an image; BadImage when it cannot or must not be read."""
    why = unsafe_name(file_name)
    if why:
        raise BadImage("unsafe_file_name", why)
    root = _local_root(image_root)
    try:
        if root is not None:
            real = _local_path(root, file_name)
            size = os.path.getsize(real)
            f = None if size > max_bytes else open(real, "rb")
        else:
            url = image_root.rstrip("/") + "/" + file_name.replace("\\", "/")
            fs, path = fsspec.core.url_to_fs(url)
            try:
                size = retrying(fs).size(path)  # a throttled look is retried, not quarantined
            except FileNotFoundError:
                raise BadImage("missing_file", f"{url} does not exist") from None
            if size is not None and size > max_bytes:
                f = None
            elif block_size:  # the header alone: ranged reads
                f = fs.open(path, "rb", block_size=block_size)
            else:  # the whole file, read under retry
                f = retrying(fs).open(path, "rb")
    except OSError as e:
        raise BadImage("read_error", f"{type(e).__name__}: {e}") from e
    if f is None:
        raise BadImage("file_too_large", f"{size} bytes > limit {max_bytes}")
    return f, size


def _open_image(fp, max_pixels: int, nbytes: int | None) -> Image.Image:
    """PIL's lazy open (header only) with the pixel limit; BadImage on a header that does not decode."""
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise BadImage("decode_error", f"not a decodable image ({nbytes} bytes): {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage("decode_error", f"header does not decode ({nbytes} bytes): {e}") from e
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage("too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return im


@dataclass(slots=True, frozen=True)
class Header:
    """What an image's header says: stored size, format, mode."""

    width: int
    height: int
    format: str
    mode: str


def check_header(
    image_root: str, file_name: str, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> Header:
    """Cheap check of one image without decoding its pixels: the name is safe, the file exists inside the root
    (symlinks resolved), its header decodes and its pixel count is within `max_pixels`.

    Reads only the header (on object storage: one ranged read of HEADER_BLOCK bytes for common formats).
    Raises BadImage(reason, detail) otherwise. Safe to call from several threads.
    """
    f, size = _open_file(image_root, file_name, max_bytes, block_size=HEADER_BLOCK)
    with f:
        im = _open_image(f, max_pixels, size)
        return Header(im.size[0], im.size[1], im.format or "", im.mode)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any decodable PIL mode -> 8-bit RGB; raises ValueError naming the mode when there is no sensible way."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit (and 32-bit int) grey: PNG/TIFF use the full 0..65535 range, so /257 maps it onto 0..255.
        # Float images in [0, 1] are scaled by 255; other float ranges are treated like 16-bit.
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0 / 257.0
        arr = np.nan_to_num(np.clip(arr * scale, 0, 255)).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels often hold black RGB; compose on white as viewers show them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "RGBX", "HSV"):
        # CMYK JPEGs: PIL undoes Adobe's inverted CMYK while decoding; convert() is the standard naive map.
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"image mode {mode!r} has no conversion to RGB: {e}") from e


@dataclass(slots=True, frozen=True)
class Decoded:
    """A fully decoded image: RGB pixels (stored grid) and what the file held."""

    rgb: Image.Image
    format: str
    mode: str  # the file's mode before conversion (CMYK, P, I;16, ...)
    orientation: int  # EXIF orientation, 1 when absent; reported, not applied
    nbytes: int
    sha256: str


def decode_image(
    image_root: str,
    record: ImageRecord,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    check_size: bool = True,
) -> Decoded:
    """Read and fully decode one image as 8-bit RGB; BadImage(reason, detail) when it cannot be used.

    Every pixel is decoded (a truncated or corrupt file fails here with the decoder's message, where a header
    check passes). Safe to call from several threads (no global state is changed).
    """
    f, _ = _open_file(image_root, record.file_name, max_bytes)
    try:
        with f:
            blob = f.read()
    except OSError as e:
        raise BadImage("read_error", f"{type(e).__name__}: {e}") from e
    im = _open_image(io.BytesIO(blob), max_pixels, len(blob))
    # PIL's default, restored in case a library relaxed it: a truncated file must fail, not decode as grey
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage("decode_error", f"decoding failed ({len(blob)} bytes): {e}") from e
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        orientation = 1
    mode, fmt = im.mode, im.format or ""
    try:
        rgb = _to_rgb(im)
    except ValueError as e:
        raise BadImage("unsupported_mode", str(e)) from e
    if check_size and record.width > 0 and record.height > 0 and rgb.size != (record.width, record.height):
        raise BadImage(
            "size_mismatch",
            f"decoded size {rgb.size[0]}x{rgb.size[1]} != annotated {record.width}x{record.height}",
        )
    return Decoded(rgb, fmt, mode, orientation, len(blob), hashlib.sha256(blob).hexdigest())


def load_image(
    image_root: str,
    record: ImageRecord,
    *,
    stage: str = "caption",
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    check_size: bool = True,
) -> tuple[Image.Image | None, Quarantined | None]:
    """Decode one image as 8-bit RGB, or say why not.

    Args:
        image_root: folder (local path, file:// or any fsspec URI) the record's file name is relative to.
        record: the image; its file_name must be relative and stay inside the root.
        stage: written into the quarantine row ("verify", "caption", "tag", ...).
        max_bytes / max_pixels: files or images above these are quarantined, not decoded.
        check_size: quarantine an image whose decoded size differs from the record's width x height
            (its boxes would not fit the pixels).

    Returns:
        (image, None) on success, else (None, Quarantined) whose record is the file name and whose detail
        names the file and the offending values.
    """
    try:
        d = decode_image(
            image_root, record, max_bytes=max_bytes, max_pixels=max_pixels, check_size=check_size
        )
    except BadImage as e:
        return _quarantine(stage, record, e.reason, e.detail)
    return d.rgb, None


__all__ = [
    "MAX_BYTES",
    "MAX_PIXELS",
    "BadImage",
    "Decoded",
    "Header",
    "check_header",
    "decode_image",
    "load_image",
    "quarantine_row",
    "unsafe_name",
]
