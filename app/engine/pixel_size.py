"""The physical pixel size an uploaded file records about itself, in microns per pixel, so that areas in
µm² can be given when the client sends no pixel size.

Only TIFF is read; the first source present wins:

1. OME-TIFF: the OME-XML in ImageDescription (tag 270), `Pixels/@PhysicalSizeX|Y` with their units.
2. Baseline TIFF: XResolution/YResolution (282/283) per ResolutionUnit (296) inch or centimetre.
3. ImageJ TIFF: ResolutionUnit "none" with an `ImageJ=` description whose `unit=` names the unit that
   XResolution/YResolution count pixels per.

PNG (pHYs), JPEG (JFIF/EXIF) and BMP densities are never read: they are screen or print densities set
by whatever program saved the file, not a record of the optics. A reading is dropped (None) when X and Y
differ by more than 1 % (areas assume square pixels; averaging them would misstate every area) or lies
outside 0.01–100 µm per pixel (a TIFF saved at the default 72 dpi says 352.8 µm: a default, not a
microscope). Only the header is read, no pixel data is decoded, and no input makes it raise."""

from __future__ import annotations

import io
import math
import re
import xml.etree.ElementTree as ET
from typing import Any

from PIL import Image, TiffImagePlugin

#: Plausible microscope pixel sizes, µm per pixel; anything outside is a default or an error.
MIN_UM_PER_PIXEL, MAX_UM_PER_PIXEL = 0.01, 100.0
#: X and Y may differ by this fraction of the larger; more is a non-square pixel, refused.
SQUARE_TOLERANCE = 0.01
#: ImageDescription longer than this is not parsed (an OME-XML header for one image is a few kB).
MAX_DESCRIPTION_BYTES = 1 << 20

_DESCRIPTION, _X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT = 270, 282, 283, 296
#: µm per ResolutionUnit: 2 = inch, 3 = centimetre; 1 (none) carries no length.
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}
#: µm per OME `UnitsLength` symbol (case matters: "mm" is not "Mm"); both micro signs are accepted.
_OME_UNIT_UM = {
    "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0,  # µ, μ
    "nm": 1e-3, "pm": 1e-6, "\u00c5": 1e-4, "\u212b": 1e-4,  # Å: letter A-ring, angstrom sign
}  # fmt: skip
#: The OME schema's default for PhysicalSizeXUnit/PhysicalSizeYUnit. Source: the units table of
#: ome/omero-documentation, omero/developers/Model/Units.rst ("Pixels PhysicalSizeX Length µm"),
#: which follows `default="µm"` on these attributes in the OME XML schema (ome.xsd, 2016-06).
_OME_DEFAULT_UNIT = "\u00b5m"  # µm, MICRO SIGN as the schema spells it
#: µm per ImageJ `unit=` value, lower-cased; ImageJ escapes µ as the six characters `\u00B5`.
_IMAGEJ_UNIT_UM = {
    "micron": 1.0, "microns": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "um": 1.0,
    "nm": 1e-3, "mm": 1e3, "cm": 1e4,
}  # fmt: skip
_IMAGEJ_UNIT = re.compile(r"^unit=([^\r\n]*)$", re.MULTILINE)


def pixel_size_from_file(data: bytes) -> float | None:
    """Microns per pixel recorded in the file, or None.

    None for anything but a TIFF with a usable calibration: other formats, corrupt or truncated bytes,
    non-square pixels and implausible sizes (see the module docstring)."""
    try:
        with Image.open(io.BytesIO(data), formats=("TIFF",)) as image:
            if not isinstance(image, TiffImagePlugin.TiffImageFile):
                return None
            reading = _tiff_reading(image.tag_v2)  # the first IFD, read at open; pixels stay undecoded
    except Exception:  # anything Pillow or a malformed tag raises means "no calibration"
        return None
    return _accepted(reading)


def _tiff_reading(tags: Any) -> tuple[float, float] | None:
    """(x, y) µm per pixel from the first IFD's tags, unchecked; None when no source is present."""
    description = _description_bytes(tags.get(_DESCRIPTION))
    if description is not None:
        ome = _ome_reading(description)
        if ome is not None:
            return ome
    unit = tags.get(_RESOLUTION_UNIT, 2)  # TIFF 6.0: absent means inch
    if unit in _RESOLUTION_UNIT_UM:
        return _per_unit(tags, _RESOLUTION_UNIT_UM[unit])
    if unit == 1 and description is not None:
        um_per_unit = _imagej_um_per_unit(description)
        if um_per_unit is not None:
            return _per_unit(tags, um_per_unit)
    return None


def _description_bytes(value: object) -> bytes | None:
    """ImageDescription as the bytes in the file (Pillow decodes ASCII tags as Latin-1), or None."""
    if isinstance(value, str):
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raw = value.encode("utf-8")
    elif isinstance(value, bytes):
        raw = value
    else:
        return None
    return raw if len(raw) <= MAX_DESCRIPTION_BYTES else None


def _per_unit(tags: Any, um_per_unit: float) -> tuple[float, float] | None:
    """(x, y) µm per pixel from XResolution/YResolution given in pixels per unit of `um_per_unit` µm."""
    x, y = _positive(tags.get(_X_RESOLUTION)), _positive(tags.get(_Y_RESOLUTION))
    if x is None or y is None:
        return None
    return um_per_unit / x, um_per_unit / y


def _positive(value: object) -> float | None:
    """`value` (a number or Pillow's `IFDRational`) as a finite positive float, else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) and number > 0 else None


class _PixelsFound(Exception):
    """Stops the parse once the first `Pixels` element has been seen."""


class _FirstPixels:
    """ElementTree parser target: keeps the first `{*}Pixels` element's attributes; refuses any DTD."""

    def __init__(self) -> None:
        self.attrib: dict[str, str] | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if tag == "Pixels" or tag.endswith("}Pixels"):  # `{*}Pixels`: any namespace, OME's changes yearly
            self.attrib = dict(attrib)
            raise _PixelsFound

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise ValueError("a DTD in ImageDescription is refused")  # no entities, hence no entity bombs

    def close(self) -> None:
        return None


def _ome_reading(description: bytes) -> tuple[float, float] | None:
    """(x, y) µm per pixel from OME-XML, or None when the description is no OME-XML with both sizes."""
    if b"Pixels" not in description or b"<!DOCTYPE" in description or b"<!ENTITY" in description:
        return None
    target = _FirstPixels()
    parser = ET.XMLParser(target=target)  # expat: no external entities are ever fetched
    try:
        parser.feed(description)
        parser.close()
    except _PixelsFound:
        pass
    except Exception:  # ParseError, the DTD refusal, expat's own amplification limit
        return None
    attrib = target.attrib
    if attrib is None:
        return None
    x = _ome_length(attrib.get("PhysicalSizeX"), attrib.get("PhysicalSizeXUnit", _OME_DEFAULT_UNIT))
    y = _ome_length(attrib.get("PhysicalSizeY"), attrib.get("PhysicalSizeYUnit", _OME_DEFAULT_UNIT))
    return None if x is None or y is None else (x, y)


def _ome_length(value: str | None, unit: str) -> float | None:
    """An OME length attribute in µm, or None when absent, not a positive number or in an unknown unit."""
    size, factor = _positive(value), _OME_UNIT_UM.get(unit.strip())
    return None if size is None or factor is None else size * factor


def _imagej_um_per_unit(description: bytes) -> float | None:
    """µm per the unit an ImageJ description names (`unit=micron`), or None if it is no ImageJ one."""
    text = description.decode("utf-8", "replace")
    if not text.startswith("ImageJ="):
        return None
    match = _IMAGEJ_UNIT.search(text)
    return None if match is None else _IMAGEJ_UNIT_UM.get(match.group(1).strip().lower())


def _accepted(reading: tuple[float, float] | None) -> float | None:
    """The pixel size for square, plausible readings (geometric mean of X and Y, which keeps the pixel's
    area exact), None otherwise."""
    if reading is None:
        return None
    x, y = reading
    if abs(x - y) > SQUARE_TOLERANCE * max(x, y):
        return None
    size = math.sqrt(x * y)
    return size if MIN_UM_PER_PIXEL <= size <= MAX_UM_PER_PIXEL else None
