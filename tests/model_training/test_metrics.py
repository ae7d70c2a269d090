"""Metrics against hand-computed cases, and the training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_training.losses import DiceCELoss, soft_dice_loss
from model_training.metrics import (
    METRICS,
    REGIONS,
    SURFACE_METRICS,
    average_score,
    binary_scores,
    region_scores,
    summarize,
    surface_dice,
)

TARGET = np.array([[0, 1, 1, 2],
                   [0, 1, 2, 2]])
PRED = np.array([[0, 1, 2, 2],
                 [1, 1, 2, 2]])
#: Worked by hand from TARGET and PRED (8 pixels).
#: nucleus: tp 3, fp 1, fn 0, tn 4; cytoplasm: tp 2, fp 1, fn 1, tn 4; cell: tp 6, fp 1, fn 0, tn 1.
EXPECTED = {
    "nucleus": {"dice": 6 / 7, "iou": 3 / 4, "precision": 3 / 4, "recall": 1.0, "accuracy": 7 / 8},
    "cytoplasm": {"dice": 2 / 3, "iou": 1 / 2, "precision": 2 / 3, "recall": 2 / 3, "accuracy": 6 / 8},
    "cell": {"dice": 12 / 13, "iou": 6 / 7, "precision": 6 / 7, "recall": 1.0, "accuracy": 7 / 8},
}


def test_region_scores_match_hand_computed_values() -> None:
    scores = region_scores(PRED, TARGET)

    for region in REGIONS:
        for metric in METRICS:
            assert scores[region][metric] == pytest.approx(EXPECTED[region][metric]), (region, metric)


def test_average_score_is_the_mean_of_all_fifteen_numbers() -> None:
    expected = np.mean([v for r in EXPECTED.values() for v in r.values()])

    assert average_score(region_scores(PRED, TARGET)) == pytest.approx(expected)


def test_class_absent_from_both_masks_scores_one_everywhere() -> None:
    no_nucleus = np.array([[0, 1], [1, 0]])

    scores = region_scores(no_nucleus, no_nucleus.copy())

    assert scores["nucleus"] == {m: 1.0 for m in METRICS}


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        (np.zeros((2, 2), bool), np.eye(2, dtype=bool),
         {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "accuracy": 0.5}),
        (np.eye(2, dtype=bool), np.zeros((2, 2), bool),
         {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 1.0, "accuracy": 0.5}),
    ],
    ids=["missed-region", "false-region"],
)
def test_region_present_in_one_mask_only_scores_zero_overlap(pred: np.ndarray, target: np.ndarray,
                                                             expected: dict[str, float]) -> None:
    assert binary_scores(pred, target) == pytest.approx(expected)


def test_binary_scores_reject_masks_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        binary_scores(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_summarize_gives_mean_and_sample_sd_over_images() -> None:
    perfect = region_scores(TARGET, TARGET)
    partial = region_scores(PRED, TARGET)

    summary = summarize([perfect, partial])

    dice = summary["cytoplasm"]["dice"]
    assert dice["mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert dice["sd"] == pytest.approx(np.std([1, 2 / 3], ddof=1))
    assert summary["average"]["score"]["mean"] == pytest.approx((1 + average_score(partial)) / 2)
    assert summarize([perfect])["nucleus"]["iou"] == {"mean": 1.0, "sd": 0.0}


def _ring(outer: int, inner: int, size: int = 64) -> np.ndarray:
    """A square rim: `outer` wide, `inner` hollow, centred."""
    mask = np.zeros((size, size), bool)
    a, b = (size - outer) // 2, (size - inner) // 2
    mask[a:a + outer, a:a + outer] = True
    mask[b:b + inner, b:b + inner] = False
    return mask


def test_surface_dice_forgives_a_thin_rim_drawn_a_pixel_wider_where_dice_does_not() -> None:
    expert, drawn = _ring(30, 24), _ring(30, 26)   # a 3 px rim, drawn 2 px wide: its inner edge 1 px off

    assert binary_scores(drawn, expert)["dice"] < 0.85
    assert surface_dice(drawn, expert, (0, 1, 2)) == [pytest.approx(0.5, abs=0.05), 1.0, 1.0]


def test_surface_dice_counts_the_share_of_both_outlines_within_the_tolerance() -> None:
    square = np.zeros((40, 40), bool)
    square[10:30, 10:30] = True
    moved = np.roll(square, 3, axis=1)             # 3 px to the right

    # Each outline has 76 pixels. Of the moved one: the top and bottom rows lie on the square's but for
    # their last 3 pixels (1, 2, 3 px off); the right side is 3 px off; the left side 3 px off but for
    # its ends, 1, 2, 3 px from the square's top and bottom rows. Within 1 px: 2 * 18 + 2 = 38; within
    # 2 px: 2 * 19 + 4 = 42; within 3: all. The square's outline against the moved one is the mirror.
    assert surface_dice(moved, square, (1, 2, 3)) == [pytest.approx(38 / 76), pytest.approx(42 / 76), 1.0]
    assert surface_dice(square, square, (0,)) == [1.0]
    assert surface_dice(np.zeros_like(square), np.zeros_like(square), (1, 2)) == [1.0, 1.0]
    assert surface_dice(np.zeros_like(square), square, (5,)) == [0.0]
    with pytest.raises(ValueError, match="shape mismatch"):
        surface_dice(square, square[:-1], (1,))


def test_region_scores_add_surface_dice_only_when_asked_and_the_average_ignores_it() -> None:
    plain, both = region_scores(PRED, TARGET), region_scores(PRED, TARGET, surface=True)

    assert set(plain["cell"]) == set(METRICS)
    assert set(both["cell"]) == set(METRICS) | set(SURFACE_METRICS)
    assert average_score(both) == average_score(plain)
    assert set(summarize([both, both])["cytoplasm"]) == set(METRICS) | set(SURFACE_METRICS)
    assert set(summarize([both, plain])["cytoplasm"]) == set(METRICS)   # only where every image has it


def test_summarize_rejects_no_images() -> None:
    with pytest.raises(ValueError, match="no images"):
        summarize([])


def test_loss_is_lower_for_the_right_answer() -> None:
    target = torch.from_numpy(TARGET)[None]
    right = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10
    wrong = right.roll(1, dims=1)
    loss = DiceCELoss()

    assert float(loss(right, target)) < 0.01
    assert float(loss(wrong, target)) > 1.0
    assert float(soft_dice_loss(right, target)) == pytest.approx(0.0, abs=1e-3)


def test_per_image_dice_weighs_a_small_region_as_much_as_a_large_one() -> None:
    # Two images: a large cytoplasm predicted right, a thin one predicted wrong. Pooled over the batch
    # the large one swamps the error; averaged per image the thin one costs half the Dice.
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, 2:30, 2:30] = 1
    target[1, 10:12, 10:20] = 1
    guess = target.clone()
    guess[1] = 0
    logits = torch.nn.functional.one_hot(guess, 3).permute(0, 3, 1, 2).float() * 20
    batch = float(soft_dice_loss(logits, target, pooling="batch"))
    image = float(soft_dice_loss(logits, target, pooling="image"))
    # Nucleus is absent everywhere and scores 1 (smoothing); the thin region's Dice is 1/21 (smoothing).
    assert batch < 0.02
    assert image == pytest.approx(1 - (1 + 1 + 1 + 1 / 21) / 4, abs=1e-3)
    assert image > 10 * batch
    assert float(DiceCELoss(dice_pooling="image")(logits, target)) > float(DiceCELoss()(logits, target))
    with pytest.raises(ValueError, match="pooling"):
        soft_dice_loss(logits, target, pooling="pixel")
