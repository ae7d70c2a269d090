"""Augmentation keeps image and label aligned; the preprocessing helpers keep shapes and classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.contract import DEFAULT_NORMALIZATION
from model_training.transforms import Augment, AugmentConfig, normalize, resize_label, to_tensor

#: Background, cytoplasm and nucleus painted in the primary colour of one channel each, so that the
#: class of every augmented pixel can be read back from its strongest channel, whatever the jitter.
PALETTE = np.array([[30, 60, 230], [40, 220, 60], [230, 40, 50]], np.uint8)
CHANNEL_TO_CLASS = torch.tensor([2, 1, 0])   # red → nucleus, green → cytoplasm, blue → background


def _scene(h: int = 90, w: int = 70) -> tuple[np.ndarray, np.ndarray]:
    """A cell cut by the left edge, an off-centre nucleus and a corner block: no symmetry to hide a
    flip or rotation applied to one side only."""
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.uint8)
    label[(yy - 40) ** 2 / 38**2 + (xx - 20) ** 2 / 30**2 <= 1] = 1
    label[(yy - 30) ** 2 + (xx - 12) ** 2 <= 12**2] = 2
    label[:8, -20:] = 2
    return PALETTE[label], label


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(zoom_out=0.4, scale_min=0.5)],
                         ids=["default", "zoom-out"])
def test_augment_keeps_image_and_label_aligned(config: AugmentConfig) -> None:
    image, label = _scene()
    agreement = []
    for seed in range(20):
        augment = Augment(48, config, torch.Generator().manual_seed(seed))
        x, y = augment(to_tensor(image), torch.from_numpy(label).long())
        agreement.append(float((CHANNEL_TO_CLASS[x.argmax(0)] == y).float().mean()))

    # Only pixels on a boundary (blurred, resampled) may disagree.
    assert min(agreement) > 0.95
    assert np.mean(agreement) > 0.985


def test_augment_returns_the_model_size_in_range_with_known_classes() -> None:
    image, label = _scene()
    augment = Augment(32, generator=torch.Generator().manual_seed(0))

    x, y = augment(to_tensor(image), torch.from_numpy(label).long())

    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.unique().tolist()) <= {0, 1, 2}


def test_augment_is_reproducible_from_its_generator() -> None:
    image, label = _scene()
    runs = [Augment(32, generator=torch.Generator().manual_seed(7))(to_tensor(image), torch.from_numpy(label))
            for _ in range(2)]

    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_resize_label_samples_pixel_centres() -> None:
    label = torch.zeros(9, 9, dtype=torch.long)
    label[1::3, 1::3] = 1   # the centre pixel of every 3×3 block

    # Shrinking ×3 must read each block's centre, where the bilinear image resize centres it too
    # (plain "nearest" reads the top-left corners: a shift of a source pixel).
    assert resize_label(label, 3).tolist() == [[1, 1, 1]] * 3


def test_normalize_uses_the_exported_mean_and_std() -> None:
    mean, std = DEFAULT_NORMALIZATION.mean, DEFAULT_NORMALIZATION.std
    x = torch.tensor(mean).view(3, 1, 1).expand(3, 2, 2) + torch.tensor(std).view(3, 1, 1)

    torch.testing.assert_close(normalize(x), torch.ones(3, 2, 2))


def test_to_tensor_accepts_read_only_arrays_without_copying_semantics_changing() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    image.setflags(write=False)

    x = to_tensor(image)

    assert x.shape == (3, 2, 3)
    assert float(x[2, 1, 2]) == pytest.approx(image[1, 2, 2] / 255)
