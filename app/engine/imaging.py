"""Decode and validate uploaded images; encode label masks and overlays as PNG."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from app.engine.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaError

logger = logging.getLogger(__name__)

#: Accepted formats, recognised by their first bytes (never by the file name).
SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}

#: File name suffixes of those formats, for picking images out of a folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Colour of each class id in mask and overlay PNGs: background, cytoplasm, nucleus.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (0, 190, 255), (255, 200, 0))
#: Outline and number colour of each cell in overlays.
CELL_OUTLINE: tuple[int, int, int] = (255, 255, 255)
_OVERLAY_ALPHA = np.array([0, 96, 128], np.uint16)  # out of 256, per class
_CLASS_COLORS_16 = np.asarray(CLASS_COLORS, np.uint16)
#: Rows blended at once: the 16-bit temporaries of the blend stay within a block, not the whole image.
_OVERLAY_ROWS = 256
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: 16-bit grey value → 8-bit, rounded: a lookup, so that a 40 MP image needs no 32-bit copies of itself.
_SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)

# A 256-entry palette makes Pillow write an 8-bit PNG: the bit depth clients expect of a label mask.
_PALETTE = [v for color in CLASS_COLORS for v in color] + [0] * (3 * (256 - len(CLASS_COLORS)))


def sniff_format(data: bytes) -> str:
    """The image format named by the file's magic bytes.

    Raises:
        InvalidImageError: for an empty file.
        UnsupportedMediaError: for anything but PNG, JPEG, BMP and TIFF.
    """
    if not data:
        raise InvalidImageError("The file is empty.")
    for fmt, signatures in SIGNATURES.items():
        if data.startswith(signatures):
            return fmt
    raise UnsupportedMediaError("The file is not a PNG, JPEG, BMP or TIFF image.")


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may ask of the decoder, checked from its header before any pixel is decoded.

    Together they bound every allocation by the image's own size: `max_pixels` bounds the decoded
    pixels (3 bytes each), `max_side` and `max_aspect` refuse shapes (1 × 40,000,000) whose rows or
    columns make per-row work and buffers explode, `max_tile_pixels` refuses TIFF tiles far larger than
    the image they belong to (libtiff allocates a whole tile), and `max_jpeg_scans` refuses progressive
    JPEGs whose repeated scans cost seconds of CPU each.
    """

    max_pixels: int = 40_000_000
    max_side: int = 30_000
    max_aspect: float = 50.0
    max_tile_pixels: int = 1 << 22
    max_jpeg_scans: int = 100


def check_image(data: bytes, limits: DecodeLimits) -> tuple[int, int]:
    """(width, height) from the file's header, checked against the limits, without decoding.

    Raises:
        InvalidImageError, UnsupportedMediaError, ImageTooLargeError.
    """
    fmt = sniff_format(data)
    image = _open(data, fmt)
    _check_header(image, fmt, data, limits)
    return image.size


def decode_image(data: bytes, max_pixels: int | DecodeLimits) -> Image.Image:
    """Decode an upload into an upright 8-bit RGB image.

    The header is checked against the limits before any pixel data is decoded; the first frame of a
    multi-frame file is used; the EXIF orientation is applied.

    Args:
        data: the file's bytes.
        max_pixels: the limits, or only the largest width × height accepted.

    Raises:
        InvalidImageError, UnsupportedMediaError, ImageTooLargeError.
    """
    limits = max_pixels if isinstance(max_pixels, DecodeLimits) else DecodeLimits(max_pixels=max_pixels)
    fmt = sniff_format(data)
    image = _open(data, fmt)
    _check_header(image, fmt, data, limits)
    try:
        image.load()
        return to_rgb(_upright(image))
    except (ImageTooLargeError, InvalidImageError):
        raise
    except Exception as exc:  # Pillow raises many types on damaged data; all mean the same here.
        logger.debug("cannot decode %s: %r", fmt, exc)
        raise InvalidImageError(f"The {fmt} file is corrupt or truncated.") from exc


def _check_header(image: Image.Image, fmt: str, data: bytes, limits: DecodeLimits) -> None:
    """Refuse what the limits forbid, from the header alone."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"The {fmt} image has no pixels.")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"The image has {width}×{height} = {width * height} pixels; "
                                 f"the limit is {limits.max_pixels}.")
    if max(width, height) > limits.max_side:
        raise ImageTooLargeError(f"The image is {width}×{height}; no side may exceed {limits.max_side} "
                                 "pixels.")
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageTooLargeError(f"The image is {width}×{height}; its sides may differ at most "
                                 f"{limits.max_aspect:g} times.")
    if fmt == "TIFF":
        _check_tiff_tiles(image, limits)
    if fmt == "JPEG":
        _check_jpeg_stream(data, width * height, limits)


#: Most pixels a JPEG may claim per byte of file: even a flat white 4000 × 3000 JPEG holds one pixel per
#: 1/64 byte (63 px/byte measured), so a file claiming thousands of pixels per byte is a decoding bomb.
_JPEG_MAX_PIXELS_PER_BYTE = 1000


def _check_jpeg_stream(data: bytes, pixels: int, limits: DecodeLimits) -> None:
    """Count scans (0xFF 0xDA; in entropy-coded data a 0xFF is always followed by 0x00 or a marker),
    require the end-of-image marker after the last scan, and refuse files far too small for their size."""
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise InvalidImageError(f"The JPEG file has {scans} scans; at most {limits.max_jpeg_scans} are "
                                "accepted.")
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise InvalidImageError("The JPEG file is truncated: its last scan has no end.")
    if pixels > _JPEG_MAX_PIXELS_PER_BYTE * len(data):
        raise InvalidImageError(f"The JPEG file claims {pixels} pixels in {len(data)} bytes; it is corrupt.")


def _check_tiff_tiles(image: Image.Image, limits: DecodeLimits) -> None:
    tags = getattr(image, "tag_v2", {})
    tile = (int(tags.get(322, 0) or 0), int(tags.get(323, 0) or 0))  # TileWidth, TileLength
    if tile[0] * tile[1] > max(limits.max_tile_pixels, 4 * image.size[0] * image.size[1]):
        raise InvalidImageError(f"The TIFF file's tiles ({tile[0]}×{tile[1]}) are far larger than its "
                                f"{image.size[0]}×{image.size[1]} image.")


def _open(data: bytes, fmt: str) -> Image.Image:
    """Read only the header; Pillow's own bomb check is ours to report."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError("The image has more pixels than the decoder allows.") from exc
    except Exception as exc:  # as in decode_image: any failure to parse the header is a bad file
        logger.debug("cannot open %s: %r", fmt, exc)
        raise InvalidImageError(f"The file starts like a {fmt} image but cannot be read.") from exc


def _upright(image: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a damaged EXIF block should not reject an image whose pixels are fine
        logger.debug("ignoring unreadable EXIF orientation: %r", exc)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; 16-bit grey maps its full range 0–65535 onto 0–255, alpha is ignored."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.dtype.itemsize > 2:  # "I": 32-bit signed
            values = np.clip(values, 0, 65535)
        return Image.fromarray(_SIXTEEN_TO_EIGHT_BITS[values]).convert("RGB")  # no wide temporaries
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
    return image.convert("RGB")


def encode_mask_png(mask: np.ndarray) -> bytes:
    """`(H, W)` uint8 class ids → an 8-bit palette PNG whose indices are the class ids."""
    image = Image.fromarray(mask)
    image.putpalette(_PALETTE)  # turns the "L" image into "P" with the class ids as indices
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def overlay(image: np.ndarray, mask: np.ndarray, instances: np.ndarray | None = None,
            labels: Sequence[tuple[int, tuple[float, float]]] = ()) -> np.ndarray:
    """Draw the classes over an `(H, W, 3)` uint8 RGB image: a translucent fill, an opaque outline; with
    `instances`, each cell's outer edge in white and its number (`labels`: id, (x, y)) beside it.

    Returns:
        `(H, W, 3)` uint8 RGB.
    """
    out = np.empty(image.shape, np.uint8)  # C order whatever the input's, for the encoder to convert in place
    height = mask.shape[0]
    for start in range(0, height, _OVERLAY_ROWS):  # a block of rows at a time: temporaries stay small
        end = min(height, start + _OVERLAY_ROWS)
        colors = _CLASS_COLORS_16[mask[start:end]]
        alpha = _OVERLAY_ALPHA[mask[start:end]][..., None]
        blended = (image[start:end].astype(np.uint16) * (256 - alpha) + colors * alpha) >> 8
        edge = _block_edges(mask, start, end)
        blended[edge] = colors[edge]
        out[start:end] = blended
        if instances is not None:
            out[start:end][_block_edges(instances, start, end)] = CELL_OUTLINE
    if instances is not None:
        _number(out, labels)
    return out


def _block_edges(mask: np.ndarray, start: int, end: int) -> np.ndarray:
    """`_edges` of rows `start:end` of `mask` that are inside a region (non-zero), from those rows and the
    one on each side."""
    low, high = max(0, start - 1), min(mask.shape[0], end + 1)
    return _edges(mask[low:high])[start - low:end - low] & (mask[start:end] > 0)


def _number(image: np.ndarray, labels: Sequence[tuple[int, tuple[float, float]]]) -> None:
    """Write each cell's id at its centroid, white on a dark outline, scaled to the image."""
    scale = max(0.4, min(image.shape[:2]) / 500)
    thickness = max(1, round(scale * 2))
    for cell_id, (x, y) in labels:
        text = str(cell_id)
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        origin = (int(x - w / 2), int(y + h / 2))
        for colour, width in (((0, 0, 0), thickness + 2), (CELL_OUTLINE, thickness)):
            cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, width, cv2.LINE_AA)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class."""
    edge = np.zeros(mask.shape, bool)
    vertical = mask[1:] != mask[:-1]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def encode_overlay_png(image: np.ndarray, mask: np.ndarray, instances: np.ndarray | None = None,
                       labels: Sequence[tuple[int, tuple[float, float]]] = ()) -> bytes:
    """The overlay of `mask` (and numbered cells) on `(H, W, 3)` RGB `image`, as an RGB PNG (encoded by
    OpenCV from the array: Pillow would first copy it into 4 bytes a pixel)."""
    pixels = overlay(image, mask, instances, labels)
    cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR, dst=pixels)  # OpenCV writes BGR; in place, no second copy
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay")
    return encoded.tobytes()


def encode_instances_png(instances: np.ndarray) -> bytes:
    """`(H, W)` uint16 cell ids → a 16-bit greyscale PNG holding them exactly."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(instances, np.uint16)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
