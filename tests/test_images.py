"""tasks.images.load_image: odd modes converted, bad files and unsafe names quarantined with the file named."""

from __future__ import annotations

import io
import os

import fsspec
import numpy as np
import pytest
from PIL import Image

from storage.records import ImageRecord
from tasks.images import load_image


def _rec(name: str, w: int = 32, h: int = 24, image_id: int = 7) -> ImageRecord:
    return ImageRecord(image_id, name, w, h, 0)


def _save(root, name: str, im: Image.Image, fmt: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, format=fmt)
    return name


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
    ],
)
def test_modes_become_rgb(tmp_path, mode, fmt):
    src = Image.new("RGB", (32, 24), (200, 40, 10))
    im = src.convert(mode)
    name = _save(tmp_path, f"sub/img_{mode}.{fmt.lower()}", im, fmt)
    out, q = load_image(str(tmp_path), _rec(name))
    assert q is None
    assert out.mode == "RGB" and out.size == (32, 24)


def test_16bit_grey_scaled_not_clipped(tmp_path):
    arr = np.full((24, 32), 65535, dtype=np.uint16)
    arr[:, :16] = 257 * 100  # -> 100 after /257
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out, q = load_image(str(tmp_path), _rec("g16.png"))
    assert q is None
    px = np.asarray(out)
    assert px.dtype == np.uint8
    assert px[0, 0].tolist() == [100, 100, 100]
    assert px[0, 31].tolist() == [255, 255, 255]


def test_transparent_palette_composed_on_white(tmp_path):
    im = Image.new("RGBA", (32, 24), (0, 0, 0, 0))
    im.save(tmp_path / "t.png")
    out, q = load_image(str(tmp_path), _rec("t.png"))
    assert q is None
    assert np.asarray(out)[5, 5].tolist() == [255, 255, 255]


def test_truncated_jpeg_quarantined(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 48), 50).convert("RGB").save(buf, format="JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out, q = load_image(str(tmp_path), _rec("cut.jpg", 64, 48))
    assert out is None
    assert (
        q.reason == "decode_error"
        and "truncated" in q.detail
        and q.record == "cut.jpg"
        and "cut.jpg" in q.detail
    )
    assert q.stage == "caption" and q.image_id == 7


def test_corrupt_file_quarantined(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    out, q = load_image(str(tmp_path), _rec("junk.jpg"), stage="tag")
    assert out is None and q.reason == "decode_error" and q.stage == "tag" and "junk.jpg" in q.detail


def test_missing_file_quarantined(tmp_path):
    out, q = load_image(str(tmp_path), _rec("nope/none.jpg"))
    assert out is None and q.reason == "missing_file" and "nope/none.jpg" in q.detail


def test_huge_image_quarantined_before_decoding(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    out, q = load_image(str(tmp_path), _rec("big.png", 200, 100), max_pixels=10_000)
    assert out is None and q.reason == "too_large"
    assert "200x100" in q.detail and "big.png" in q.detail


def test_file_over_byte_limit_quarantined(tmp_path):
    Image.new("RGB", (32, 24)).save(tmp_path / "a.png")
    out, q = load_image(str(tmp_path), _rec("a.png"), max_bytes=10)
    assert out is None and q.reason == "file_too_large" and "a.png" in q.detail


def test_size_mismatch_quarantined(tmp_path):
    Image.new("RGB", (32, 24)).save(tmp_path / "a.png")
    out, q = load_image(str(tmp_path), _rec("a.png", 24, 32))
    assert out is None and q.reason == "size_mismatch" and "32x24" in q.detail and "24x32" in q.detail


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../outside.png", "a/../../outside.png", "C:\\x.png", "s3://b/x.png", ""]
)
def test_unsafe_names_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (32, 24)).save(tmp_path / "outside.png")
    out, q = load_image(str(root), _rec(name))
    assert out is None and q.reason == "unsafe_file_name" and q.record == name


def test_symlink_leaving_root_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (32, 24)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    out, q = load_image(str(root), _rec("link.png"))
    assert out is None and q.reason == "unsafe_path" and "link.png" in q.detail and "outside" in q.detail


def test_symlink_inside_root_allowed(tmp_path):
    Image.new("RGB", (32, 24)).save(tmp_path / "real.png")
    os.symlink(tmp_path / "real.png", tmp_path / "alias.png")
    out, q = load_image(str(tmp_path), _rec("alias.png"))
    assert q is None and out.size == (32, 24)


def test_fsspec_memory_uri_and_file_uri(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (1, 2, 3)).save(buf, format="PNG")
    with fsspec.open("memory://imgs/dir/x.png", "wb") as f:
        f.write(buf.getvalue())
    out, q = load_image("memory://imgs", _rec("dir/x.png"))
    assert q is None and np.asarray(out)[0, 0].tolist() == [1, 2, 3]
    out, q = load_image("memory://imgs", _rec("dir/missing.png"))
    assert out is None and q.reason == "missing_file" and "dir/missing.png" in q.detail

    (tmp_path / "y.png").write_bytes(buf.getvalue())
    out, q = load_image(f"file://{tmp_path}", _rec("y.png"))
    assert q is None and out.size == (32, 24)


def test_check_header_reads_the_header_only(tmp_path):
    from tasks.images import BadImage, check_header
    from tests.bad_images import noise_jpeg, png_header

    blob = noise_jpeg(64, 48)
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 3])
    h = check_header(str(tmp_path), "cut.jpg")
    assert (h.width, h.height, h.format, h.mode) == (64, 48, "JPEG", "RGB")
    # 40,000 x 40,000 declared in 57 bytes: refused from the header, nothing allocated
    (tmp_path / "huge.png").write_bytes(png_header(40_000, 40_000))
    with pytest.raises(BadImage) as e:
        check_header(str(tmp_path), "huge.png")
    assert e.value.reason == "too_large" and "1600000000 pixels" in e.value.detail
    (tmp_path / "big.png").write_bytes(png_header(300, 300))
    with pytest.raises(BadImage, match=r"300x300 = 90000 pixels > limit 89999") as e:
        check_header(str(tmp_path), "big.png", max_pixels=89_999)
    assert check_header(str(tmp_path), "big.png", max_pixels=90_000).width == 300


def test_check_header_on_object_storage(tmp_path):
    from tasks.images import BadImage, check_header
    from tests.bad_images import noise_jpeg

    with fsspec.open("memory://hdr/a/x.jpg", "wb") as f:
        f.write(noise_jpeg(40, 30))
    assert (
        check_header("memory://hdr", "a/x.jpg").width,
        check_header("memory://hdr", "a/x.jpg").height,
    ) == (40, 30)
    with pytest.raises(BadImage) as e:
        check_header("memory://hdr", "a/none.jpg")
    assert e.value.reason == "missing_file" and "memory://hdr/a/none.jpg" in e.value.detail


def test_a_relaxed_pil_does_not_let_a_truncated_file_through(tmp_path, monkeypatch):
    from PIL import ImageFile

    from tests.bad_images import noise_jpeg

    blob = noise_jpeg(64, 48)
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some training scripts set it
    out, q = load_image(str(tmp_path), _rec("cut.jpg", 64, 48), stage="verify")
    assert out is None and q.reason == "decode_error" and "truncated" in q.detail
