"""Segmentation metrics per region (nucleus, cytoplasm, whole cell), as numpy on label maps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from app.engine.contract import CLASS_NAMES
from app.engine.contract import REGIONS as REGION_NAMES

_CYTOPLASM, _NUCLEUS = CLASS_NAMES.index("cytoplasm"), CLASS_NAMES.index("nucleus")
#: Regions scored (the contract's), each as the set of class ids it covers (cell = cytoplasm ∪ nucleus).
REGIONS: dict[str, tuple[int, ...]] = dict(zip(
    REGION_NAMES, ((_NUCLEUS,), (_CYTOPLASM,), (_CYTOPLASM, _NUCLEUS)), strict=True))
METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "accuracy")


def binary_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall and pixel accuracy of two boolean masks of one shape.

    A region absent from both masks is a perfect answer: every score is 1. A region present in one
    mask only scores 0 on the ratios that involve it (precision with no prediction is 0 when the
    target is not empty).
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {target.shape}")
    tp = float(np.count_nonzero(pred & target))
    fp = float(np.count_nonzero(pred & ~target))
    fn = float(np.count_nonzero(~pred & target))
    tn = float(pred.size) - tp - fp - fn

    def ratio(num: float, den: float) -> float:
        return 1.0 if den == 0 else num / den

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0),
        "recall": ratio(tp, tp + fn),
        "accuracy": (tp + tn) / pred.size,
    }


def region_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, dict[str, float]]:
    """Scores of every region in `REGIONS` for two `(H, W)` label maps."""
    return {name: binary_scores(np.isin(pred, cls), np.isin(target, cls))
            for name, cls in REGIONS.items()}


def average_score(scores: Mapping[str, Mapping[str, float]]) -> float:
    """The "average evaluation score": mean of every metric in `METRICS` over every region."""
    return float(np.mean([scores[r][m] for r in REGIONS for m in METRICS]))


def summarize(
    per_image: Iterable[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample sd over images of each region's metrics, plus the average score.

    Returns:
        `{region: {metric: {"mean": m, "sd": s}}, "average": {"score": {"mean", "sd"}}}`.
    """
    items = list(per_image)
    if not items:
        raise ValueError("no images to summarise")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for region in REGIONS:
        out[region] = {}
        for metric in METRICS:
            values = np.array([s[region][metric] for s in items])
            out[region][metric] = _mean_sd(values)
    out["average"] = {"score": _mean_sd(np.array([average_score(s) for s in items]))}
    return out


def _mean_sd(values: np.ndarray) -> dict[str, float]:
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd}
