"""Accepted formats and pixel modes, recognised by content; orientation; multi-frame files."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.service import encode, png_array, png_rgb16, problem, sample_rgb, upload

from app.engine.imaging import to_rgb


def mask_of(client: TestClient, data: bytes, name: str = "cell.png") -> np.ndarray:
    response = client.post("/v1/segment?format=png", files=upload(data, name))
    assert response.status_code == 200, response.text
    return png_array(response.content)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return sample_rgb(90, 70, seed=3)


@pytest.mark.parametrize(("fmt", "params"), [
    ("PNG", {}), ("JPEG", {"quality": 95}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
], ids=["png", "jpeg", "bmp", "tiff", "tiff-lzw"])
def test_every_accepted_format_is_segmented_at_its_size(client: TestClient, rgb: np.ndarray, fmt: str,
                                                        params: dict[str, object]) -> None:
    assert mask_of(client, encode(rgb, fmt, **params)).shape == (70, 90)


def test_lossless_formats_give_identical_masks(client: TestClient, rgb: np.ndarray) -> None:
    reference = mask_of(client, encode(rgb, "PNG"))
    for fmt in ("BMP", "TIFF"):
        assert np.array_equal(mask_of(client, encode(rgb, fmt)), reference), fmt


def test_format_comes_from_content_not_the_file_name(client: TestClient, rgb: np.ndarray) -> None:
    png = encode(rgb, "PNG")
    assert np.array_equal(mask_of(client, png, "photo.jpg"), mask_of(client, png, "noextension"))
    gif = encode(rgb, "GIF")
    problem(client.post("/v1/segment", files=upload(gif, "disguised.png")), 415)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "RGB"], ids=str)
def test_grey_and_alpha_modes_match_their_rgb_equivalent(client: TestClient, rgb: np.ndarray,
                                                         mode: str) -> None:
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    image = Image.fromarray(grey_rgb).convert(mode)
    if "A" in mode:
        image.putalpha(Image.fromarray((np.arange(grey.size) % 256).astype(np.uint8).reshape(grey.shape)))
    assert np.array_equal(mask_of(client, encode(image)), mask_of(client, encode(grey_rgb)))


def test_palette_images_use_their_palette_colours(client: TestClient, rgb: np.ndarray) -> None:
    paletted = Image.fromarray(rgb).quantize(64)
    assert np.array_equal(mask_of(client, encode(paletted)), mask_of(client, encode(paletted.convert("RGB"))))
    transparent = paletted.copy()
    transparent.info["transparency"] = 0
    assert mask_of(client, encode(transparent)).shape == (70, 90)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_images_are_converted(client: TestClient, rgb: np.ndarray, fmt: str) -> None:
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert cmyk.mode == "CMYK"
    assert mask_of(client, encode(cmyk, fmt)).shape == (70, 90)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_maps_its_full_range_onto_8_bits(client: TestClient, rgb: np.ndarray, fmt: str) -> None:
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    assert wide.mode == "I;16"
    with Image.open(io.BytesIO(encode(wide, fmt))) as reread:
        assert reread.mode.startswith("I")
    assert np.array_equal(mask_of(client, encode(wide, fmt)), mask_of(client, encode(grey)))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32], ids=["I;16", "I"])
def test_16_bit_grey_is_converted_without_wide_copies(dtype: type) -> None:
    values = np.random.default_rng(0).integers(0, 65536, (1000, 1000)).astype(dtype)
    image = Image.fromarray(values)
    tracemalloc.start()
    rgb = to_rgb(image)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    expected = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(np.asarray(rgb)[..., 0], expected)
    # Copies of the pixels and 8-bit results; the 32-bit arithmetic this replaced peaked at 12 bytes a pixel.
    assert peak < 2 * values.nbytes + values.size


def test_16_bit_rgb_png_matches_its_8_bit_equivalent(client: TestClient, rgb: np.ndarray) -> None:
    wide = png_rgb16(rgb.astype(np.uint16) * 257)
    assert np.array_equal(mask_of(client, wide), mask_of(client, encode(rgb)))


def test_exif_orientation_is_applied(client: TestClient, rgb: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90° clockwise
    sideways = encode(rgb, "PNG", exif=exif)
    upright = encode(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270))
    mask = mask_of(client, sideways)
    assert mask.shape == (90, 70)
    assert np.array_equal(mask, mask_of(client, upright))


def test_multi_frame_files_use_the_first_frame(client: TestClient, rgb: np.ndarray) -> None:
    first, second = Image.fromarray(rgb), Image.fromarray(sample_rgb(40, 30, seed=9))
    buffer = io.BytesIO()
    first.save(buffer, format="TIFF", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(buffer.getvalue())) as check:
        assert check.n_frames == 2
    assert np.array_equal(mask_of(client, buffer.getvalue()), mask_of(client, encode(rgb, "TIFF")))


@pytest.mark.parametrize(("data", "status"), [
    (b"", 422),
    (b"hello, this is text", 415),
    (b"GIF89a" + b"\0" * 64, 415),
    (b"RIFF\0\0\0\0WEBPVP8 ", 415),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 422),
    (b"\xff\xd8\xff\xe0" + b"junk" * 10, 422),
    (b"BM" + b"\0" * 10, 422),
    (b"II*\0" + b"\xff" * 20, 422),
], ids=["empty", "text", "gif", "webp", "png-garbage", "jpeg-garbage", "bmp-garbage", "tiff-garbage"])
def test_unsupported_or_corrupt_files_are_refused(client: TestClient, data: bytes, status: int) -> None:
    problem(client.post("/v1/segment", files=upload(data)), status)


def test_a_truncated_png_is_refused_as_corrupt(client: TestClient, rgb: np.ndarray) -> None:
    data = encode(rgb)
    body = problem(client.post("/v1/segment", files=upload(data[: len(data) // 2])), 422)
    assert "PNG" in body["detail"]
