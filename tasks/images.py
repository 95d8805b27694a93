"""Image decoding shared by the caption and tag stages: safe paths, odd modes to RGB, bad files quarantined."""

from __future__ import annotations

import io
import os
import warnings

import fsspec
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from storage.records import ImageRecord, Quarantined
from storage.retry import retrying

#: Files larger than this are not read at all (a detection image is a few MB; 256 MiB is a broken file).
MAX_BYTES = 256 * 1024 * 1024
#: PIL's own decompression-bomb warning threshold (about 9459 x 9459 pixels); bigger images are quarantined.
MAX_PIXELS = 89_478_485


def _is_uri(path: str) -> bool:
    return "://" in path


def _unsafe_name(file_name: str) -> str | None:
    """Why a file name may not be joined to the image root, or None when it is safe."""
    if not file_name:
        return "the file name is empty"
    if "\x00" in file_name:
        return "the file name contains a NUL byte"
    if _is_uri(file_name):
        return "the file name is a URI, not a path relative to the image root"
    norm = file_name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "the file name is absolute"
    if ".." in norm.split("/"):
        return "the file name contains '..' and would escape the image root"
    return None


def _quarantine(stage: str, record: ImageRecord, reason: str, detail: str) -> tuple[None, Quarantined]:
    return None, Quarantined(
        stage, record.image_id, record.file_name, reason, f"{record.file_name}: {detail}"
    )


def _read_bytes(image_root: str, file_name: str, max_bytes: int) -> tuple[bytes | None, str, str]:
    """Bytes of the file, or (None, reason, detail). Local roots also refuse symlinks that leave the root."""
    if _is_uri(image_root) and not image_root.startswith("file://"):
        url = image_root.rstrip("/") + "/" + file_name.replace("\\", "/")
        fs, path = fsspec.core.url_to_fs(url)
        try:
            size = retrying(fs).size(path)
        except FileNotFoundError:
            return None, "missing_file", f"{url} does not exist"
        if size is not None and size > max_bytes:
            return None, "file_too_large", f"{url} has {size} bytes > limit {max_bytes}"
        return retrying(fs).cat_file(path), "", ""  # a throttled read is retried, not quarantined
    root = image_root[len("file://") :] if image_root.startswith("file://") else image_root
    root_real = os.path.realpath(root)
    path = os.path.join(root, file_name)
    real = os.path.realpath(path)
    if os.path.commonpath([root_real, real]) != root_real:
        return None, "unsafe_path", f"resolves to {real}, outside the image root {root_real} (symlink?)"
    if not os.path.isfile(real):
        return None, "missing_file", f"{path} does not exist or is not a file"
    size = os.path.getsize(real)
    if size > max_bytes:
        return None, "file_too_large", f"{path} has {size} bytes > limit {max_bytes}"
    with open(real, "rb") as f:
        return f.read(), "", ""


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
        stage: written into the quarantine row ("caption", "tag", ...).
        max_bytes / max_pixels: files or images above these are quarantined, not decoded.
        check_size: quarantine an image whose decoded size differs from the record's width x height
            (its boxes would not fit the pixels).

    Returns:
        (image, None) on success, else (None, Quarantined) whose record is the file name and whose detail
        names the file and the offending values.
    """
    why = _unsafe_name(record.file_name)
    if why:
        return _quarantine(stage, record, "unsafe_path", why)
    try:
        blob, reason, detail = _read_bytes(image_root, record.file_name, max_bytes)
    except OSError as e:
        return _quarantine(stage, record, "read_error", f"{type(e).__name__}: {e}")
    if blob is None:
        return _quarantine(stage, record, reason, detail)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(blob))
            w, h = im.size
            if w * h > max_pixels:
                return _quarantine(
                    stage, record, "image_too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}"
                )
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _quarantine(stage, record, "image_too_large", str(e))
    except UnidentifiedImageError as e:
        return _quarantine(stage, record, "corrupt", f"not a decodable image ({len(blob)} bytes): {e}")
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        return _quarantine(stage, record, reason, f"decoding failed ({len(blob)} bytes): {e}")
    try:
        rgb = _to_rgb(im)
    except ValueError as e:
        return _quarantine(stage, record, "unsupported_mode", str(e))
    if check_size and record.width > 0 and record.height > 0 and rgb.size != (record.width, record.height):
        return _quarantine(
            stage,
            record,
            "size_mismatch",
            f"decoded size {rgb.size[0]}x{rgb.size[1]} != recorded {record.width}x{record.height}",
        )
    return rgb, None


__all__ = ["MAX_BYTES", "MAX_PIXELS", "load_image"]
