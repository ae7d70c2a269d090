"""Dataset folders, mask-value maps, and the train/validation split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_training.data import DatasetError, MaskMap, Sample, find_pairs, load_folders, split_samples
from model_training.synthetic import make_sample, write_folder

#: Colour masks used below: class → RGB.
COLOURS = {0: (0, 0, 0), 1: (0, 255, 0), 2: (255, 0, 255)}
COLOUR_SPEC = "color:0,0,0=0;0,255,0=1;255,0,255=2"
COLOUR_JSON = json.dumps({"colors": {"0,0,0": 0, "0,255,0": 1, "255,0,255": 2}})


def _colour_folder(root: Path, count: int = 2, size: int = 40, noise: int = 0) -> Path:
    """A folder whose masks are RGB colours; `noise` shifts every mask pixel by up to that much."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image, label = make_sample(size, seed=i)
        rgb = np.asarray([COLOURS[c] for c in range(3)], np.int16)[label]
        rgb = np.clip(rgb + rng.integers(-noise, noise + 1, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(rgb).save(root / "masks" / f"{i:03d}.png")
    return root


def test_load_folders_maps_grey_masks_to_the_generated_labels(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cells", count=3, size=40, seed=5)

    samples = load_folders([folder])

    assert [(s.source, s.name) for s in samples] == [("cells", "000"), ("cells", "001"), ("cells", "002")]
    for i, s in enumerate(samples):
        image, label = make_sample(40, seed=5 * 100_003 + i)
        np.testing.assert_array_equal(s.image, image)
        np.testing.assert_array_equal(s.label, label)


def test_grey_mask_map_with_other_levels_is_needed_and_applied(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "low", count=2, size=40, mask_levels=(0, 60, 90))
    truth = [make_sample(40, seed=i)[1] for i in range(2)]

    with_map = load_folders([folder], MaskMap.parse("grey:0,60,90"))
    default = load_folders([folder])

    assert all(np.array_equal(s.label, t) for s, t in zip(with_map, truth, strict=True))
    assert not all(np.array_equal(s.label, t) for s, t in zip(default, truth, strict=True))


def test_default_grey_map_sends_stray_values_to_the_nearest_level() -> None:
    mask = Image.fromarray(np.array([[0, 2, 37, 50, 100, 128, 180, 200, 255]], np.uint8))

    assert MaskMap().apply(mask).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2]]


@pytest.mark.parametrize("spec", [COLOUR_SPEC, COLOUR_JSON], ids=["color-spec", "json"])
def test_colour_mask_map_reads_colour_masks(tmp_path: Path, spec: str) -> None:
    folder = _colour_folder(tmp_path / "colour")

    samples = load_folders([folder], MaskMap.parse(spec))

    for i, s in enumerate(samples):
        np.testing.assert_array_equal(s.label, make_sample(40, seed=i)[1])


NOISY_SPECS = [COLOUR_SPEC + "~6", json.dumps({**json.loads(COLOUR_JSON), "tolerance": 6})]


@pytest.mark.parametrize("spec", NOISY_SPECS, ids=["color-spec", "json"])
def test_colour_tolerance_accepts_noisy_colours(tmp_path: Path, spec: str) -> None:
    folder = _colour_folder(tmp_path / "noisy", noise=5)

    assert MaskMap.parse(spec).tolerance == 6
    samples = load_folders([folder], MaskMap.parse(spec))
    np.testing.assert_array_equal(samples[0].label, make_sample(40, seed=0)[1])
    with pytest.raises(DatasetError, match="not in the mask map"):
        load_folders([folder], MaskMap.parse(COLOUR_SPEC))


def test_unknown_mask_colour_raises_dataset_error_naming_the_file(tmp_path: Path) -> None:
    folder = _colour_folder(tmp_path / "colour")
    mask = np.asarray(Image.open(folder / "masks" / "001.png")).copy()
    mask[3, 4] = (10, 20, 30)
    Image.fromarray(mask).save(folder / "masks" / "001.png")

    with pytest.raises(DatasetError, match=r"001\.png.*\(10, 20, 30\)"):
        load_folders([folder], MaskMap.parse(COLOUR_SPEC))


def test_mask_map_rejects_an_unknown_spec() -> None:
    with pytest.raises(ValueError, match=r"expected 'grey:\.\.\.'"):
        MaskMap.parse("palette:1,2,3")


def test_missing_mask_raises_dataset_error_naming_the_image(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cells", count=3, size=24)
    (folder / "masks" / "001.png").unlink()

    with pytest.raises(DatasetError, match=r"001\.png: no mask named 001"):
        find_pairs(folder)


def test_missing_sub_folder_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "images").mkdir(parents=True)

    with pytest.raises(DatasetError, match="masks/"):
        load_folders([tmp_path / "empty"])


def test_mask_of_another_size_raises_dataset_error_naming_the_mask(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cells", count=2, size=24)
    Image.new("L", (20, 24)).save(folder / "masks" / "001.png")

    with pytest.raises(DatasetError, match=r"masks/001\.png: mask is 20×24 but the image 001\.png is 24×24"):
        load_folders([folder])


def _named(source: str, count: int) -> list[Sample]:
    blank = np.zeros((2, 2, 3), np.uint8)
    return [Sample(blank, blank[..., 0], source, f"{i:03d}") for i in range(count)]


def test_split_is_deterministic_whatever_the_loading_order() -> None:
    samples = _named("a", 30) + _named("b", 10)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)

    _, val = split_samples(samples, 0.2, seed=3)
    _, val_again = split_samples(shuffled, 0.2, seed=3)
    _, val_other_seed = split_samples(samples, 0.2, seed=4)

    def keys(ss: list[Sample]) -> set[tuple[str, str]]:
        return {(s.source, s.name) for s in ss}

    assert keys(val) == keys(val_again)
    assert keys(val) != keys(val_other_seed)


def test_split_is_stratified_by_source_and_partitions_the_samples() -> None:
    samples = _named("a", 30) + _named("b", 10)

    train, val = split_samples(samples, 0.2, seed=0)

    assert sum(s.source == "a" for s in val) == 6
    assert sum(s.source == "b" for s in val) == 2
    assert len(train) + len(val) == 40
    assert not {(s.source, s.name) for s in train} & {(s.source, s.name) for s in val}


def test_split_rejects_a_fraction_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_samples(_named("a", 4), 1.0)
