"""Hostile inputs, made here from nothing: shapes that explode per-row work, a TIFF whose tile claims far
more than its image, a progressive JPEG whose last scan repeats, JPEGs that claim 36 MP in 600 bytes."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def flat_png(width: int, height: int) -> bytes:
    """A PNG of one grey level: a few hundred bytes whatever its size."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def tiff_with_giant_tile(width: int = 256, height: int = 256, tile: int = 26736) -> bytes:
    """A little-endian TIFF of `width`×`height` grey pixels whose single tile claims `tile`×`tile`."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1),
               (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, 16)]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    body = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 324 else value
        long_value = kind == 4
        body += (struct.pack("<HHII", tag, kind, 1, value) if long_value
                 else struct.pack("<HHIHH", tag, kind, 1, value, 0))
    return b"II*\x00" + struct.pack("<I", ifd_offset) + body + struct.pack("<I", 0) + b"\x80" * 16


def progressive_jpeg_with_repeated_scans(repeats: int = 1000, side: int = 256) -> bytes:
    """A progressive JPEG whose last scan (SOS header and its data) is repeated `repeats` times."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:last_scan] + data[last_scan:end] * repeats + data[end:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header says `width`×`height`, cut short after its first scan header."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 160)).save(buffer, format="JPEG", quality=50)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data[:data.index(b"\xff\xda") + 40])


def packed_field_jpeg(tiles: int = 4, tile: int = 700) -> bytes:
    """A field packed with leukocyte-like discs (100 per 700-px tile), `tiles` × `tiles` tiles: every disc is
    a finder candidate, so each would cost a model run."""
    from model_training.synthetic import make_field, packed_cells

    image, _, _ = make_field(packed_cells(tile), size=(tile, tile), red_cells=0, platelets=0)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(image, (tiles, tiles, 1))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sixteen_bit_tiff(side: int = 6300) -> bytes:
    """A deflate-compressed 16-bit grey TIFF of `side`² pixels (40 MP by default) in about 120 kB: a
    legitimate image whose conversion to 8 bits once made 32-bit copies of it."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 30000, np.uint16)).save(buffer, format="TIFF",
                                                                  compression="tiff_adobe_deflate")
    return buffer.getvalue()


def oip_json_zeros(count: int = 45_000_000) -> bytes:
    """An Open Inference Protocol request whose image is a JSON list of `count` zeros (2 bytes each: 90 MB
    by default), each of which a JSON parser would make an object."""
    return (b'{"inputs":[{"name":"image","shape":[' + str(count).encode() + b'],"datatype":"UINT8","data":['
            + b"0," * (count - 1) + b"0]}]}")
