"""A reproducible corpus of damaged image files: PNG, JPEG, BMP and TIFF with flipped bits, truncations,
splices of two files, and headers broken field by field. The same seed gives the same files."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model_training.synthetic import make_sample

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_SUFFIX = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}


@dataclass(frozen=True)
class Mutant:
    """One damaged file and how it was made."""

    name: str
    data: bytes


def base_files(seed: int = 0) -> dict[str, list[bytes]]:
    """Valid files of every format: a few sizes, colour and grey, TIFF raw and compressed."""
    files: dict[str, list[bytes]] = {fmt: [] for fmt in FORMATS}
    for i, (h, w) in enumerate([(48, 40), (33, 57), (64, 64)]):
        rgb, _ = make_sample((h, w), seed=seed + i)
        for image in (Image.fromarray(rgb), Image.fromarray(rgb).convert("L")):
            for fmt in FORMATS:
                files[fmt].append(_encode(image, fmt))
        files["TIFF"].append(_encode(Image.fromarray(rgb), "TIFF", compression="tiff_lzw"))
        files["PNG"].append(_encode(Image.fromarray(rgb).convert("P"), "PNG"))
    return files


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 24)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(1, len(data))]


def overwrite_span(data: bytes, rng: random.Random) -> bytes:
    """A run of zeros, 0xff or random bytes somewhere in the file."""
    start = rng.randrange(len(data))
    length = rng.randint(1, 64)
    fill = rng.choice([b"\x00" * length, b"\xff" * length, rng.randbytes(length)])
    return data[:start] + fill + data[start + length:]


def header_field(data: bytes, fmt: str, rng: random.Random) -> bytes:
    """One header field of the format set to a hostile value: sizes 0 or huge, depths and offsets wrong."""
    out = bytearray(data)
    value = rng.choice([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])
    if fmt == "PNG":  # IHDR: width 16, height 20, bit depth 24, colour type 25, then the CRC
        offset = rng.choice([16, 20, 24, 25, 29, 33])
        size = 1 if offset in (24, 25) else 4
    elif fmt == "BMP":  # file size 2, pixel offset 10, width 18, height 22, bpp 28, compression 30
        offset = rng.choice([2, 10, 14, 18, 22, 28, 30, 34, 46])
        size = 2 if offset == 28 else 4
    elif fmt == "TIFF":  # the first IFD offset at 4, then one IFD entry's type, count or value
        first_ifd = struct.unpack_from("<I", data, 4)[0]
        offset = rng.choice([4, first_ifd, first_ifd + 2 + 12 * rng.randrange(4) + rng.choice([2, 4, 8])])
        size = 2 if offset == first_ifd else 4
    else:  # JPEG: a marker segment's length, or the frame's height/width/components
        sof = data.find(b"\xff\xc0")
        offset = rng.choice([4, sof + 2, sof + 5, sof + 7, sof + 9, data.find(b"\xff\xda") + 2])
        size = 1 if offset == sof + 9 else 2
    if offset < 0 or offset + size > len(out):
        return flip_bits(data, rng)
    fmt_code = {1: ">B", 2: ">H" if fmt in ("PNG", "JPEG") else "<H", 4: ">I" if fmt == "PNG" else "<I"}
    struct.pack_into(fmt_code[size], out, offset, value & ((1 << (8 * size)) - 1))
    return bytes(out)


def splice(a: bytes, b: bytes, rng: random.Random) -> bytes:
    """The start of one file followed by the end of another (of any format)."""
    return a[:rng.randrange(1, len(a))] + b[rng.randrange(len(b)):]


def mutants(count_per_format: int = 80, seed: int = 0) -> list[Mutant]:
    """`count_per_format` damaged files of each format, in a fixed order."""
    rng = random.Random(seed)
    bases = base_files(seed)
    everything = [f for files in bases.values() for f in files]
    kinds: list[tuple[str, Callable[[bytes, str], bytes]]] = [
        ("bitflip", lambda d, f: flip_bits(d, rng)),
        ("truncated", lambda d, f: truncate(d, rng)),
        ("overwritten", lambda d, f: overwrite_span(d, rng)),
        ("header", lambda d, f: header_field(d, f, rng)),
        ("spliced", lambda d, f: splice(d, rng.choice(everything), rng)),
    ]
    out = []
    for fmt in FORMATS:
        for i in range(count_per_format):
            kind, mutate = kinds[i % len(kinds)]
            data = mutate(rng.choice(bases[fmt]), fmt)
            out.append(Mutant(f"{fmt.lower()}-{i:03d}-{kind}.{_SUFFIX[fmt]}", data))
    return out


def real_grey_png(width: int, height: int) -> bytes:
    """A complete, valid 8-bit grey PNG of `width`×`height` (a flat grey with a gradient row pattern),
    compressed row by row so that it is never whole in memory here."""
    row = b"\x00" + (np.arange(width) % 251).astype(np.uint8).tobytes()
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
