"""Dataset folders of `images/` + `masks/` → (image, label) pairs; mask-value mapping; splits."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from app.engine.imaging import IMAGE_SUFFIXES
from model_training import NUM_CLASSES

#: Grey levels of the wbc-zheng2018 masks: background, cytoplasm, nucleus (nearest level wins).
DEFAULT_GREY_LEVELS: tuple[int, ...] = (0, 128, 255)


class DatasetError(ValueError):
    """A dataset folder is malformed: a missing or mismatched mask, an unknown mask value."""


@dataclass(frozen=True)
class MaskMap:
    """How the pixel values of a mask file become class indices 0, 1, 2.

    `grey` maps by the nearest grey level (index = class); `colors` maps exact RGB colours, with an
    optional `tolerance` (max per-channel distance) for JPEG-like noise. Exactly one is set.
    """

    grey: tuple[int, ...] | None = DEFAULT_GREY_LEVELS
    colors: dict[tuple[int, int, int], int] | None = None
    tolerance: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> MaskMap:
        """Build from a command-line spec.

        Accepted forms: `grey:0,128,255` (nearest level; position = class), or
        `color:255,255,255=2;128,128,128=1;0,0,0=0` (exact colours, `~N` after the last pair for a
        tolerance), or a JSON object `{"grey": [...]}` / `{"colors": {"R,G,B": class}, "tolerance": N}`.
        """
        if not spec:
            return cls()
        spec = spec.strip()
        if spec.startswith("{"):
            obj = json.loads(spec)
            if "grey" in obj:
                return cls(grey=tuple(int(v) for v in obj["grey"]))
            colors = {tuple(int(c) for c in k.split(",")): int(v) for k, v in obj["colors"].items()}
            return cls(grey=None, colors=colors, tolerance=int(obj.get("tolerance", 0)))  # type: ignore[arg-type]
        kind, _, body = spec.partition(":")
        if kind == "grey":
            return cls(grey=tuple(int(v) for v in body.split(",")))
        if kind in ("color", "colour"):
            body, _, tol = body.partition("~")
            colors = {}
            for pair in body.split(";"):
                rgb, _, cls_idx = pair.partition("=")
                colors[tuple(int(c) for c in rgb.split(","))] = int(cls_idx)
            return cls(grey=None, colors=colors, tolerance=int(tol or 0))  # type: ignore[arg-type]
        raise ValueError(f"mask map {spec!r}: expected 'grey:...', 'color:...' or JSON")

    def apply(self, mask: Image.Image, path: Path | str = "<mask>") -> np.ndarray:
        """Map a mask image to a `(H, W)` uint8 array of class indices.

        Raises:
            DatasetError: for a colour map when a pixel matches no colour.
        """
        if self.colors is None:
            grey = np.asarray(mask.convert("L"), dtype=np.int16)
            levels = np.asarray(self.grey, dtype=np.int16)
            return np.abs(grey[..., None] - levels).argmin(axis=-1).astype(np.uint8)
        rgb = np.asarray(mask.convert("RGB"), dtype=np.int16)
        label = np.full(rgb.shape[:2], 255, dtype=np.uint8)
        for color, index in self.colors.items():
            hit = (np.abs(rgb - np.asarray(color, dtype=np.int16)).max(axis=-1) <= self.tolerance)
            label[hit] = index
        if (label == 255).any():
            bad = tuple(int(v) for v in rgb[label == 255][0])
            raise DatasetError(f"{path}: mask colour {bad} is not in the mask map")
        return label


@dataclass
class Sample:
    """One image with its label and where it came from."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8 class indices
    source: str
    name: str
    meta: dict[str, str] = field(default_factory=dict)


def find_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """List `(image, mask)` paths of a dataset folder, matched by file stem.

    Raises:
        DatasetError: if `images/` or `masks/` is missing, or an image has no mask.
    """
    images_dir, masks_dir = folder / "images", folder / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DatasetError(f"{folder}: expected a sub-folder {d.name}/")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = masks.get(image.stem)
        if mask is None:
            raise DatasetError(f"{image}: no mask named {image.stem}.* in {masks_dir}")
        pairs.append((image, mask))
    if not pairs:
        raise DatasetError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def load_sample(image_path: Path, mask_path: Path, mask_map: MaskMap, source: str) -> Sample:
    """Read one image/mask pair, checking that their sizes agree."""
    with Image.open(image_path) as im:
        image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    with Image.open(mask_path) as m:
        label = mask_map.apply(m, mask_path)
    if label.shape != image.shape[:2]:
        raise DatasetError(f"{mask_path}: mask is {label.shape[1]}×{label.shape[0]} but the image "
                           f"{image_path.name} is {image.shape[1]}×{image.shape[0]}")
    if label.max() >= NUM_CLASSES:
        raise DatasetError(f"{mask_path}: class {label.max()} out of range")
    return Sample(image=image, label=label, source=source, name=image_path.stem)


def load_folders(folders: Sequence[Path | str], mask_map: MaskMap | None = None) -> list[Sample]:
    """Load every pair of several dataset folders; each folder's name is its source."""
    mask_map = mask_map or MaskMap()
    samples = []
    for folder in map(Path, folders):
        source = folder.name
        samples.extend(load_sample(i, m, mask_map, source) for i, m in find_pairs(folder))
    return samples


def split_samples(samples: Sequence[Sample], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/val split, stratified by source: each source gives the same fraction.

    The split depends only on the names, the sources and `seed`, not on the order of loading.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for source in sorted({s.source for s in samples}):
        group = sorted((s for s in samples if s.source == source), key=lambda s: s.name)
        random.Random(f"{seed}:{source}").shuffle(group)
        n_val = round(len(group) * val_fraction)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


def parse_oversample(specs: Sequence[str]) -> dict[str, int]:
    """Parse `SOURCE=K` items (e.g. `dataset2=2`) into `{source: K}`."""
    factors = {}
    for spec in specs:
        source, sep, k = spec.partition("=")
        if not sep or not k.isdigit() or int(k) < 1:
            raise ValueError(f"oversample {spec!r}: expected SOURCE=K with an integer K >= 1")
        factors[source] = int(k)
    return factors


def oversample(samples: Sequence[Sample], factors: dict[str, int]) -> list[Sample]:
    """Repeat each sample of a source `factors[source]` times (1 for a source not named).

    Used on the training side only, so that a small, harder source weighs more in every epoch.

    Raises:
        ValueError: when a named source has no samples (a typo would otherwise pass silently).
    """
    missing = set(factors) - {s.source for s in samples}
    if missing:
        raise ValueError(f"oversample names unknown source(s): {', '.join(sorted(missing))}")
    return [s for s in samples for _ in range(factors.get(s.source, 1))]
