"""Pixel size from file metadata on generated files: TIFF resolution tags, OME-XML, ImageJ descriptions,
the formats and readings refused, and hostile descriptions (huge, entity bombs) refused quickly."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from app.engine.pixel_size import pixel_size_from_file

#: Pillow warns about the corrupt headers some cases are made of; returning None is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")

OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def tiff(tiffinfo: dict[int, Any] | None = None, size: tuple[int, int] = (8, 6), **params: Any) -> bytes:
    """An RGB TIFF of `size` saved by Pillow with the given tags and save parameters."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 180, 220)).save(buffer, "TIFF", tiffinfo=tiffinfo or {}, **params)
    return buffer.getvalue()


def ome(pixels_attributes: str, namespace: str = OME_NS) -> bytes:
    """OME-XML for one 8x6 image whose `Pixels` element carries `pixels_attributes`, as UTF-8."""
    xmlns = f' xmlns="{namespace}"' if namespace else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><OME{xmlns}><Image ID="Image:0"><Pixels ID="Pixels:0" '
        f'DimensionOrder="XYCZT" Type="uint8" SizeX="8" SizeY="6" SizeC="3" SizeZ="1" SizeT="1" '
        f"{pixels_attributes}/></Image></OME>"
    ).encode()


def sizes(x: str, y: str, unit: str) -> str:
    """`Pixels` attributes giving both physical sizes in `unit`."""
    return f'PhysicalSizeX="{x}" PhysicalSizeXUnit="{unit}" PhysicalSizeY="{y}" PhysicalSizeYUnit="{unit}"'


def imagej(unit: str, pixels_per_unit: float, y_pixels_per_unit: float | None = None) -> bytes:
    """A TIFF as ImageJ writes a calibrated image: ResolutionUnit none, the unit in the description."""
    description = f"ImageJ=1.54f\nimages=1\nunit={unit}\nmin=0.0\nmax=255.0\n".encode()
    y = pixels_per_unit if y_pixels_per_unit is None else y_pixels_per_unit
    return tiff({270: description, 282: pixels_per_unit, 283: y, 296: 1})


def encoded(image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 180, 220)).save(buffer, image_format, **params)
    return buffer.getvalue()


CALIBRATED = [
    pytest.param(tiff({282: 50800.0, 283: 50800.0, 296: 2}), 0.5, id="tiff-inch"),
    pytest.param(tiff({282: 20000.0, 283: 20000.0}), 25400 / 20000, id="tiff-no-unit-tag-is-inch"),
    pytest.param(tiff({282: 40000.0, 283: 40000.0, 296: 3}), 0.25, id="tiff-centimetre"),
    pytest.param(tiff(dpi=(25400, 25400)), 1.0, id="tiff-dpi-param"),
    pytest.param(tiff({282: 50800.0, 283: 50800.0, 296: 2}, big_tiff=True), 0.5, id="bigtiff-inch"),
    pytest.param(
        tiff({282: 50800.0, 283: 50800.0 * 1.005, 296: 2}), 0.5 / 1.005**0.5, id="within-1pct-geometric-mean"
    ),
    pytest.param(
        tiff({270: ome(sizes("0.25", "0.25", "\u00b5m"))}),
        0.25,
        id="ome-micron",
    ),
    pytest.param(
        tiff({270: ome(sizes("250", "250", "nm"))}),
        0.25,
        id="ome-nanometre",
    ),
    pytest.param(tiff({270: ome('PhysicalSizeX="0.3" PhysicalSizeY="0.3"')}), 0.3, id="ome-default-unit"),
    pytest.param(
        tiff({270: ome('PhysicalSizeX="0.3" PhysicalSizeY="0.3"', namespace="")}), 0.3, id="ome-no-namespace"
    ),
    pytest.param(
        tiff(
            {
                270: ome(
                    'PhysicalSizeX="0.0004" PhysicalSizeXUnit="mm" PhysicalSizeY="4000" '
                    'PhysicalSizeYUnit="\u00c5"'
                )
            }
        ),
        0.4,
        id="ome-millimetre-and-angstrom",
    ),
    pytest.param(tiff({270: ome(sizes("0.2", "0.2", "\u03bcm"))}), 0.2, id="ome-greek-mu"),
    pytest.param(tiff({270: ome(sizes("2000", "2000", "\u212b"))}), 0.2, id="ome-angstrom-sign"),
    pytest.param(
        tiff({270: ome('PhysicalSizeX="0.2" PhysicalSizeXUnit="&#181;m" PhysicalSizeY="0.2"')}),
        0.2,
        id="ome-char-reference-unit",
    ),
    pytest.param(
        tiff({270: ome('PhysicalSizeX="0.2" PhysicalSizeY="0.2"'), 282: 72.0, 283: 72.0, 296: 2}),
        0.2,
        id="ome-wins-over-72dpi-tags",
    ),
    pytest.param(imagej("micron", 4.0), 0.25, id="imagej-micron"),
    pytest.param(imagej("\\u00B5m", 2.0), 0.5, id="imagej-escaped-micro"),
    pytest.param(imagej("um", 5.0), 0.2, id="imagej-um"),
    pytest.param(imagej("nm", 0.004), 0.25, id="imagej-nanometre"),
    pytest.param(imagej("mm", 4000.0), 0.25, id="imagej-millimetre"),
]


@pytest.mark.parametrize(("data", "expected"), CALIBRATED)
def test_reads_calibration(data: bytes, expected: float) -> None:
    assert pixel_size_from_file(data) == pytest.approx(expected, rel=1e-6)


UNCALIBRATED = [
    pytest.param(tiff(), id="tiff-no-tags"),
    pytest.param(tiff({282: 4.0, 283: 4.0, 296: 1}), id="unit-none-without-imagej"),
    pytest.param(imagej("pixel", 4.0), id="imagej-unit-pixel"),
    pytest.param(tiff(dpi=(72, 72)), id="72dpi-implausible"),
    pytest.param(tiff({282: 25400.0 * 1000, 283: 25400.0 * 1000, 296: 2}), id="too-small-implausible"),
    pytest.param(tiff({282: 50800.0, 283: 25400.0, 296: 2}), id="non-square-tags"),
    pytest.param(imagej("micron", 4.0, 2.0), id="non-square-imagej"),
    pytest.param(tiff({270: ome('PhysicalSizeX="0.2" PhysicalSizeY="0.4"')}), id="non-square-ome"),
    pytest.param(tiff({270: ome('PhysicalSizeX="0.2"')}), id="ome-without-y"),
    pytest.param(
        tiff({270: ome('PhysicalSizeX="0.2" PhysicalSizeY="0.2" PhysicalSizeXUnit="furlong"')}),
        id="ome-unknown-unit",
    ),
    pytest.param(tiff({270: ome('PhysicalSizeX="-0.2" PhysicalSizeY="-0.2"')}), id="ome-negative"),
    pytest.param(tiff({270: ome('PhysicalSizeX="nan" PhysicalSizeY="nan"')}), id="ome-nan"),
    pytest.param(
        tiff({270: b"<OME><Pixels PhysicalSizeX='0.2' PhysicalSizeY='0.2'"}), id="ome-truncated-xml"
    ),
    pytest.param(tiff({282: IFDRational(1, 0), 283: IFDRational(1, 0), 296: 2}), id="zero-denominator"),
    pytest.param(encoded("PNG", dpi=(50800, 50800)), id="png-with-dpi"),
    pytest.param(encoded("JPEG", dpi=(50800, 50800)), id="jpeg-with-dpi"),
    pytest.param(encoded("BMP"), id="bmp"),
    pytest.param(b"", id="empty"),
    pytest.param(b"not an image at all", id="text"),
    pytest.param(b"II*\x00\xff\xff\xff\x7f" + bytes(64), id="tiff-ifd-offset-past-end"),
    pytest.param(b"MM\x00*" + bytes(range(256)) * 4, id="tiff-garbage-ifd"),
    pytest.param(tiff({282: 50800.0, 283: 50800.0, 296: 2})[:40], id="tiff-truncated-in-ifd"),
]


@pytest.mark.parametrize("data", UNCALIBRATED)
def test_refuses_missing_implausible_or_foreign(data: bytes) -> None:
    assert pixel_size_from_file(data) is None


def test_reads_header_only() -> None:
    """A calibrated TIFF whose pixel data is cut off still gives its size: the pixels are never decoded."""
    data = tiff({282: 50800.0, 283: 50800.0, 296: 2}, size=(512, 512))
    assert len(data) > 512 * 512 * 3
    assert pixel_size_from_file(data[: len(data) - 512 * 512 * 2]) == pytest.approx(0.5)


BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">'
    + b"".join(b'<!ENTITY lol%d "%s">' % (i, b"&lol%d;" % (i - 1) * 10) for i in range(1, 10))
    + b']><OME><Pixels PhysicalSizeX="&lol9;" PhysicalSizeY="0.2"/></OME>'
)
HUGE = ome('PhysicalSizeX="0.2" PhysicalSizeY="0.2"') + b"<!--" + b"Pixels " * (2 * 1024 * 1024 // 7) + b"-->"


@pytest.mark.parametrize(
    "description",
    [
        pytest.param(BILLION_LAUGHS, id="billion-laughs"),
        pytest.param(BILLION_LAUGHS.replace(b"<!DOCTYPE", b"<!doctype"), id="billion-laughs-lowercase"),
        pytest.param(HUGE, id="description-over-1mib"),
    ],
)
def test_hostile_description_refused_fast(description: bytes) -> None:
    data = tiff({270: description})
    started = time.perf_counter()
    assert pixel_size_from_file(data) is None
    assert time.perf_counter() - started < 1.0
