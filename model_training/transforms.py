"""Training-time augmentation in PyTorch; the normalisation comes from the model contract, and every
prediction (evaluation, calibration, parity) prepares images through the engine's `InputTransform`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from app.engine.cells import window_pixels
from app.engine.contract import DEFAULT_NORMALIZATION, StainNormalization
from app.engine.stain import normalize_stain
from app.engine.transform import InputTransform


def input_transform(size: int, stain: StainNormalization | None = None) -> InputTransform:
    """The engine's preprocessing for a model trained at `size` × `size` with the training normalisation
    (and the run's stain normalisation, if it has one)."""
    return InputTransform.create((size, size), DEFAULT_NORMALIZATION, stain)


def stain_of(train_config: dict[str, Any]) -> StainNormalization | None:
    """The stain normalisation a run's configuration (a checkpoint's or model.json's) recorded, if any."""
    reference = train_config.get("stain_reference")
    return StainNormalization.model_validate(reference) if reference else None


def normalize_stain_tensor(x: torch.Tensor, stain: StainNormalization) -> torch.Tensor:
    """`(3, H, W)` in [0, 1] through the engine's stain normalisation (`app.engine.stain`), as the
    service applies it to the network's input."""
    pixels = x.permute(1, 2, 0).numpy() * 255.0
    return torch.from_numpy(normalize_stain(pixels, stain)).permute(2, 0, 1).div_(255.0)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` uint8 → `(3, H, W)` float in [0, 1]."""
    # Arrays read through Pillow are read-only; torch warns on those, so copy them (only them).
    return torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise `(N, 3, H, W)` or `(3, H, W)` in [0, 1] with the contract's `DEFAULT_NORMALIZATION`
    (`to_tensor` has already applied its scale)."""
    shape = (3, 1, 1)
    mean = torch.tensor(DEFAULT_NORMALIZATION.mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(DEFAULT_NORMALIZATION.std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean) / std


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize `(3, H, W)` to `(3, size, size)`: bilinear, antialiased when shrinking (as Pillow does)."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def resize_label(y: torch.Tensor, size: int) -> torch.Tensor:
    """Resize `(H, W)` class indices to `(size, size)` by nearest neighbour."""
    # "nearest-exact" samples at pixel centres as the bilinear image resize does; plain "nearest"
    # shifts the label up to half a source pixel towards the top-left.
    return F.interpolate(y[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; 0 switches one off."""

    scale_min: float = 0.7          # smallest crop side, as a fraction of the image side
    zoom_out: float = 0.15          # largest border added (fraction of the side), red cells included
    flip: bool = True
    rotate90: bool = True
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.04               # fraction of a full turn
    stain: float = 0.08             # per-channel gain
    blur_p: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.2)  # Gaussian blur σ in pixels at the model's input size
    noise_std: float = 0.02
    hed: float = 0.0                # HED stain jitter σ (Tellez et al.): 0 = off, ~0.05 = light
    # Scale as the engine's windows give it: a square window around the labelled cell in which the cell
    # spans U(low, high) of the side, replacing scale_min/zoom_out (None = off).
    window_fraction: tuple[float, float] | None = None
    window_jitter: float = 0.05     # the window's centre off the cell's, as a fraction of its side


class Augment:
    """Random crop/scale, flips, 90° rotations, colour/stain jitter, blur and noise on one sample."""

    def __init__(self, size: int, config: AugmentConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.size = size
        self.config = config or AugmentConfig()
        self.rng = generator or torch.Generator().manual_seed(0)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.rng))

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment `(3, H, W)` in [0, 1] and `(H, W)` labels; return them at `(size, size)`."""
        image, label = self._crop(image, label)
        image, label = resize_image(image, self.size), resize_label(label, self.size)
        image, label = self._geometry(image, label)
        return self._colour(image).clamp_(0.0, 1.0), label

    def _crop(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        _, h, w = image.shape
        if c.window_fraction is not None and bool((label > 0).any()):
            return self._window(image, label, c.window_fraction)
        if c.zoom_out > 0 and self._uniform(0, 1) < 0.3:
            pad = round(self._uniform(0, c.zoom_out) * max(h, w))
            if pad:
                # The label is padded like the image: a leukocyte mirrored into the border is labelled
                # as one, not as background.
                mode = "reflect" if pad < min(h, w) else "replicate"
                image = F.pad(image[None], (pad,) * 4, mode=mode)[0]
                label = F.pad(label[None, None].float(), (pad,) * 4, mode=mode)[0, 0].long()
                return image, label
        side = self._uniform(c.scale_min, 1.0)
        ch, cw = max(1, int(h * side)), max(1, int(w * side * self._uniform(0.9, 1.1)))
        cw = min(cw, w)
        top = int(self._uniform(0, h - ch + 1))
        left = int(self._uniform(0, w - cw + 1))
        return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]

    def _window(self, image: torch.Tensor, label: torch.Tensor,
                fraction: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """A square window around the cell (the box of the largest labelled region) in which the cell's
        longer side is `fraction` of the window side, the centre jittered; cut by the engine's own
        `window_pixels`, so that beyond the image the image is mirrored exactly as the service's windows
        are."""
        count, _, stats, _ = cv2.connectedComponentsWithStats((label > 0).numpy().astype(np.uint8),
                                                              connectivity=8)
        x0, y0, w, h = (int(v) for v in stats[1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA])), :4])
        side = max(8, round(max(w, h) / self._uniform(*fraction)))
        jitter = self.config.window_jitter * side
        left = round(x0 + w / 2 + self._uniform(-jitter, jitter) - side / 2)
        top = round(y0 + h / 2 + self._uniform(-jitter, jitter) - side / 2)
        pixels = window_pixels(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), left, top, side)
        labels = window_pixels(label.numpy().astype(np.uint8), left, top, side)
        return (torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1),
                torch.from_numpy(np.ascontiguousarray(labels)).long())

    def _geometry(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.flip and self._uniform(0, 1) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if self.config.flip and self._uniform(0, 1) < 0.5:
            image, label = image.flip(-2), label.flip(-2)
        if self.config.rotate90:
            k = int(self._uniform(0, 4))
            image, label = image.rot90(k, (-2, -1)), label.rot90(k, (-2, -1))
        return image.contiguous(), label.contiguous()

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.hed:
            # Drawn only when on, so that a run without it sees the random numbers it always saw.
            alpha = [self._uniform(1 - c.hed, 1 + c.hed) for _ in range(3)]
            beta = [self._uniform(-c.hed, c.hed) for _ in range(3)]
            x = hed_jitter(x, alpha, beta)
        x = x * (1 + self._uniform(-c.brightness, c.brightness))
        mean = x.mean()
        x = (x - mean) * (1 + self._uniform(-c.contrast, c.contrast)) + mean
        grey = x.mean(dim=0, keepdim=True)
        x = (x - grey) * (1 + self._uniform(-c.saturation, c.saturation)) + grey
        if c.hue:
            x = _rotate_hue(x, self._uniform(-c.hue, c.hue) * 2 * math.pi)
        if c.stain:
            gains = torch.tensor([self._uniform(-c.stain, c.stain) for _ in range(3)]).view(3, 1, 1)
            x = x * (1 + gains)
        if self._uniform(0, 1) < c.blur_p:
            x = _gaussian_blur(x, self._uniform(*c.blur_sigma))
        if c.noise_std:
            x = x + torch.randn(x.shape, generator=self.rng) * self._uniform(0, c.noise_std)
        return x


#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density per RGB
#: channel, as scikit-image's `rgb_from_hed`; `HED_FROM_RGB` is its inverse.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: Darkest intensity taken into the logarithm; scikit-image also divides optical densities by
#: `-ln(OD_FLOOR)` so that its stain concentrations lie in about [0, 1].
OD_FLOOR = 1e-6
OD_SCALE = -math.log(OD_FLOOR)


def rgb_to_od(x: torch.Tensor) -> torch.Tensor:
    """Optical density `-ln(I)` of `(3, H, W)` intensities in [0, 1] (floored at `OD_FLOOR`)."""
    return -torch.log(x.clamp_min(OD_FLOOR))


def _mix(matrix: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """`out[i] = Σ_j x[j] · matrix[j, i]` over the channel axis of `(3, H, W)` (row vectors · matrix)."""
    m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.einsum("ji,jhw->ihw", m, x)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """Colour deconvolution of `(3, H, W)` RGB in [0, 1] into H, E, D stain concentrations on
    scikit-image's scale (`skimage.color.rgb2hed` is this, clipped at 0 and channels last)."""
    return _mix(HED_FROM_RGB, rgb_to_od(x) / OD_SCALE)


def hed_to_rgb(s: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed`: `(3, H, W)` stain concentrations → RGB (not clipped;
    `skimage.color.hed2rgb` is this clipped to [0, 1])."""
    return torch.exp(-_mix(RGB_FROM_HED, s) * OD_SCALE)


def hed_jitter(x: torch.Tensor, alpha: Sequence[float], beta: Sequence[float]) -> torch.Tensor:
    """Stain augmentation in optical-density space (Tellez et al., 2018): scale each of the H, E and D
    concentrations by `alpha[c]` and shift it by `beta[c]`, then recombine.

    The shift is in optical-density units (natural log), i.e. `beta / OD_SCALE` on scikit-image's
    concentration scale: a shift of 0.05 darkens or lightens by a few per cent, where the same number
    on scikit-image's scale would shift the optical density by 0.69. `alpha = 1, beta = 0` returns
    the image (up to rounding, for intensities above `OD_FLOOR`).

    Args:
        x: `(3, H, W)` RGB in [0, 1].
        alpha: three gains, for H, E and D.
        beta: three optical-density shifts, for H, E and D.
    """
    stains = _mix(HED_FROM_RGB, rgb_to_od(x))
    a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).view(3, 1, 1)
    b = torch.as_tensor(beta, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return torch.exp(-_mix(RGB_FROM_HED, stains * a + b))


def _rotate_hue(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate hue by `angle` radians around the grey axis of RGB space."""
    cos, sin = math.cos(angle), math.sin(angle)
    k = 1 / 3
    s = math.sqrt(k)
    m = torch.tensor([
        [cos + (1 - cos) * k, k * (1 - cos) - s * sin, k * (1 - cos) + s * sin],
        [k * (1 - cos) + s * sin, cos + k * (1 - cos), k * (1 - cos) - s * sin],
        [k * (1 - cos) - s * sin, k * (1 - cos) + s * sin, cos + k * (1 - cos)],
    ], dtype=x.dtype)
    return torch.einsum("ij,jhw->ihw", m, x)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    # Reflect padding needs a radius below the image's side; a wider σ is cut there.
    radius = max(1, min(math.ceil(2 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(x[None], (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
