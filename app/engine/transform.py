"""The preprocessing transform: an RGB image → the network's `(3, h, w)` float32 input, as in training."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from app.engine.contract import ModelMetadata, Normalization, StainNormalization
from app.engine.stain import normalize_stain

# The engine's callers run their own threads; OpenCV's pool would compete with onnxruntime's for the cores.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class InputTransform:
    """RGB image → `(3, h, w)` float32 network input; training, evaluation, calibration and the service
    all prepare images through this one class.

    Bilinear resize (antialiased when shrinking, as Pillow does it) to the model's input size, then the
    model's stain normalisation if it has one (`app.engine.stain`, statistics of the resized image), then
    `(pixel * scale - mean) / std` per channel, folded here into one multiply-add.
    """

    size: tuple[int, int]  # (height, width)
    gain: np.ndarray  # (3,) scale / std
    offset: np.ndarray  # (3,) -mean / std
    stain: StainNormalization | None = None

    @classmethod
    def create(cls, size: tuple[int, int], normalization: Normalization,
               stain: StainNormalization | None = None) -> InputTransform:
        """The transform to `size` = (height, width) with `normalization` (after `stain`, if given)."""
        std = np.asarray(normalization.std, np.float32)
        return cls(tuple(size), (normalization.scale / std).astype(np.float32),  # type: ignore[arg-type]
                   (-np.asarray(normalization.mean, np.float32) / std).astype(np.float32), stain)

    @classmethod
    def from_metadata(cls, metadata: ModelMetadata) -> InputTransform:
        """The transform that `metadata` describes."""
        return cls.create(metadata.input.size, metadata.normalization, metadata.stain)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """`(3, h, w)` float32 for a Pillow RGB image or an `(H, W, 3)` uint8 array."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return self.normalize(self.normalize_stain(self.resize(image)))

    def normalize_stain(self, planes: np.ndarray) -> np.ndarray:
        """`(3, h, w)` pixel values (0–255) after the model's stain normalisation (unchanged without)."""
        if self.stain is None:
            return planes
        return normalize_stain(planes.transpose(1, 2, 0), self.stain).transpose(2, 0, 1)

    def normalize(self, planes: np.ndarray) -> np.ndarray:
        """`(3, h, w)` pixel values (0–255) → normalised float32 network input."""
        return np.ascontiguousarray(planes * self.gain[:, None, None] + self.offset[:, None, None],
                                    dtype=np.float32)

    def resize(self, image: Image.Image) -> np.ndarray:
        """`(3, h, w)` float32 pixel values (0–255) at the model's input size."""
        height, width = self.size
        if image.size == (width, height):
            return np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        if image.width <= width and image.height <= height:
            # Growing, bilinear has no antialiasing to do: OpenCV's is the same arithmetic, several
            # times faster than three Pillow passes.
            pixels = np.asarray(image, dtype=np.float32)
            return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        # Each channel is resized as 32-bit float: Pillow resizing the 8-bit image would round to whole
        # grey levels after each of its two passes, up to one level away from training.
        return np.stack([np.asarray(image.getchannel(c).convert("F").resize(
            (width, height), Image.Resampling.BILINEAR)) for c in range(3)])
