"""Augmentation keeps image and label aligned; the preprocessing helpers keep shapes and classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.contract import DEFAULT_NORMALIZATION
from model_training.transforms import (
    OD_SCALE,
    Augment,
    AugmentConfig,
    hed_jitter,
    hed_to_rgb,
    normalize,
    resize_label,
    rgb_to_hed,
    to_tensor,
)

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


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(zoom_out=0.4, scale_min=0.5),
                                    AugmentConfig(hed=0.05), AugmentConfig(window_fraction=(0.4, 0.8))],
                         ids=["default", "zoom-out", "hed", "window"])
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


@pytest.mark.parametrize("fraction", [(0.45, 0.5), (0.7, 0.75)])
def test_window_scale_gives_the_cell_the_asked_share_of_the_side(fraction) -> None:
    # A cell well inside a larger image: each window holds it whole at the asked share of its side,
    # whatever its size in the source image.
    yy, xx = np.mgrid[0:160, 0:160]
    label = np.zeros((160, 160), np.uint8)
    label[(yy - 70) ** 2 + (xx - 90) ** 2 <= 25**2] = 1
    label[(yy - 70) ** 2 + (xx - 90) ** 2 <= 10**2] = 2
    label[150:158, 2:10] = 1  # a sliver of a neighbour in the corner: the window is sized to the cell
    config = AugmentConfig(window_fraction=fraction, rotate90=False)
    shares = []
    for seed in range(10):
        _, y = Augment(64, config, torch.Generator().manual_seed(seed))(to_tensor(PALETTE[label]),
                                                                          torch.from_numpy(label).long())
        ys, xs = torch.nonzero(y > 0, as_tuple=True)
        assert int((y == 2).sum()) > 0 and int(xs.min()) > 0 and int(xs.max()) < 63
        shares.append(max(int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1) / 64)
    assert fraction[0] - 0.04 <= min(shares) and max(shares) <= fraction[1] + 0.04


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


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def _random_rgb(seed: int = 0) -> np.ndarray:
    """A 24×20 uint8 image holding black, white and saturated pixels too."""
    image = np.random.default_rng(seed).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    return image


def test_rgb_to_hed_is_scikit_images_rgb2hed() -> None:
    color = pytest.importorskip("skimage.color")
    image = _random_rgb()

    ours = rgb_to_hed(_chw(image / 255.0))
    ours32 = rgb_to_hed(to_tensor(image))

    expected = color.rgb2hed(image)   # clipped at 0, channels last
    np.testing.assert_allclose(np.maximum(_hwc(ours), 0), expected, atol=1e-9)
    np.testing.assert_allclose(np.maximum(_hwc(ours32), 0), expected, atol=1e-5)


def test_hed_to_rgb_is_scikit_images_hed2rgb() -> None:
    color = pytest.importorskip("skimage.color")
    stains = np.random.default_rng(1).uniform(-0.05, 0.3, (16, 12, 3))

    ours = hed_to_rgb(_chw(stains))

    np.testing.assert_allclose(np.clip(_hwc(ours), 0, 1), color.hed2rgb(stains), atol=1e-9)


def test_identity_hed_jitter_round_trips() -> None:
    image = to_tensor(_random_rgb(2))

    same = hed_jitter(image, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])

    # Black is floored at 1e-6 before the logarithm, so it comes back as 1e-6.
    torch.testing.assert_close(same, image, atol=2e-6, rtol=1e-5)


def test_hed_jitter_scales_and_shifts_stains_as_scikit_image_would() -> None:
    color = pytest.importorskip("skimage.color")
    # An image made of non-negative stain mixtures, so that rgb2hed's clipping at 0 changes nothing.
    stains = np.random.default_rng(3).uniform(0.0, 0.15, (16, 12, 3))
    image = color.hed2rgb(stains)
    alpha, beta = [1.04, 0.97, 1.02], [0.03, -0.02, 0.01]

    ours = hed_jitter(_chw(image), alpha, beta)

    # beta is in optical-density units: divided by OD_SCALE on scikit-image's concentration scale.
    expected = color.hed2rgb(color.rgb2hed(image) * np.array(alpha) + np.array(beta) / OD_SCALE)
    np.testing.assert_allclose(np.clip(_hwc(ours), 0, 1), expected, atol=1e-9)


def test_hed_jitter_changes_colour_a_little_and_leaves_white_nearly_white() -> None:
    image = to_tensor(_random_rgb(4))

    darker = hed_jitter(image, [1.05, 1.05, 1.05], [0.05, 0.05, 0.05]).clamp(0, 1)

    change = (darker - image).abs()
    assert 0 < float(change.mean()) < 0.1
    assert float(darker[:, 0, 1].min()) > 0.85   # the white pixel


def test_hed_jitter_changes_the_colour_but_not_the_geometry() -> None:
    image, label = _scene()
    x, y = to_tensor(image), torch.from_numpy(label).long()

    off, on = (Augment(40, AugmentConfig(hed=hed), torch.Generator().manual_seed(11))(x, y)
               for hed in (0.0, 0.05))

    assert torch.equal(on[1], off[1]), "the crop, flips and rotation are drawn before the colour"
    assert not torch.equal(on[0], off[0])


def test_blur_and_noise_strength_follow_the_config() -> None:
    image, label = _scene()
    x, y = to_tensor(image), torch.from_numpy(label).long()
    only = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "stain": 0, "blur_p": 1.0,
            "flip": False, "rotate90": False, "scale_min": 1.0, "zoom_out": 0.0}

    def edges(config: AugmentConfig) -> float:
        out, _ = Augment(40, config, torch.Generator().manual_seed(3))(x, y)
        return float((out[:, :, 1:] - out[:, :, :-1]).abs().mean())

    sharp = edges(AugmentConfig(**only, blur_sigma=(0.3, 0.3), noise_std=0.0))
    soft = edges(AugmentConfig(**only, blur_sigma=(6.0, 6.0), noise_std=0.0))
    noisy = edges(AugmentConfig(**only, blur_sigma=(0.3, 0.3), noise_std=0.2))
    assert soft < 0.7 * sharp
    assert noisy > 1.5 * sharp


def test_training_takes_the_blur_and_noise_limits() -> None:
    from model_training.train import augment_config, parse_args

    # The defaults are the augmentation's own, so that older runs see the same random draws.
    assert augment_config(parse_args(["--synthetic"])) == AugmentConfig()
    wide = augment_config(parse_args(["--synthetic", "--blur-max", "6", "--noise-std", "0.06"]))
    assert (wide.blur_sigma, wide.noise_std, wide.blur_p) == ((0.3, 6.0), 0.06, AugmentConfig().blur_p)
    off = augment_config(parse_args(["--synthetic", "--blur-max", "0", "--noise-std", "0"]))
    assert (off.blur_p, off.noise_std) == (0.0, 0.0)
    image, label = _scene()
    x, y = to_tensor(image), torch.from_numpy(label).long()
    out, _ = Augment(40, off, torch.Generator().manual_seed(3))(x, y)
    assert torch.isfinite(out).all()
    with pytest.raises(SystemExit):
        parse_args(["--synthetic", "--noise-std", "-0.1"])


def test_a_blur_wider_than_the_image_is_cut_at_its_side() -> None:
    image, label = _scene()
    x, y = to_tensor(image), torch.from_numpy(label).long()
    config = AugmentConfig(blur_p=1.0, blur_sigma=(30.0, 30.0))
    out, _ = Augment(24, config, torch.Generator().manual_seed(3))(x, y)
    assert out.shape == (3, 24, 24) and torch.isfinite(out).all()
