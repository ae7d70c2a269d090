"""Segmentation metrics per region (nucleus, cytoplasm, whole cell), as numpy on label maps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import cv2
import numpy as np

from app.engine.contract import CLASS_NAMES
from app.engine.contract import REGIONS as REGION_NAMES

_CYTOPLASM, _NUCLEUS = CLASS_NAMES.index("cytoplasm"), CLASS_NAMES.index("nucleus")
#: Regions scored (the contract's), each as the set of class ids it covers (cell = cytoplasm ∪ nucleus).
REGIONS: dict[str, tuple[int, ...]] = dict(zip(
    REGION_NAMES, ((_NUCLEUS,), (_CYTOPLASM,), (_CYTOPLASM, _NUCLEUS)), strict=True))
METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "accuracy")
#: Tolerances (pixels of the scored image) of the surface Dice that `wbc-evaluate` reports beside them.
SURFACE_TOLERANCES: tuple[int, ...] = (1, 2)
SURFACE_METRICS: tuple[str, ...] = tuple(f"surface_dice_{t}px" for t in SURFACE_TOLERANCES)
_SQUARE = np.ones((3, 3), np.uint8)


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


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a neighbour (of 8) outside it; the image's edge counts as outside."""
    inner = cv2.erode(mask.astype(np.uint8), _SQUARE, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & (inner == 0)


def surface_dice(pred: np.ndarray, target: np.ndarray, tolerances: Iterable[float]) -> list[float]:
    """Normalised surface Dice of two boolean masks at each tolerance, in pixels (Nikolov et al. 2021,
    "Clinically applicable segmentation of head and neck anatomy for radiotherapy"; Metrics Reloaded's
    boundary measure): the share of both outlines that lies within the tolerance of the other outline.
    Unlike Dice it does not punish an outline drawn a pixel or two off, which on a thin cytoplasm rim
    costs many points of Dice. Both masks empty: 1; one empty: 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {target.shape}")
    tolerances = list(tolerances)
    a, b = _outline(pred), _outline(target)
    if not a.any() or not b.any():
        return [float(a.any() == b.any())] * len(tolerances)

    def distance_to(outline: np.ndarray) -> np.ndarray:
        return cv2.distanceTransform((~outline).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    a_to_b, b_to_a = distance_to(b)[a], distance_to(a)[b]
    total = a_to_b.size + b_to_a.size
    return [float(np.count_nonzero(a_to_b <= t) + np.count_nonzero(b_to_a <= t)) / total for t in tolerances]


def region_scores(pred: np.ndarray, target: np.ndarray, surface: bool = False) -> dict[str, dict[str, float]]:
    """Scores of every region in `REGIONS` for two `(H, W)` label maps; with `surface`, also the surface
    Dice at each of `SURFACE_TOLERANCES` (`SURFACE_METRICS`)."""
    scores = {}
    for name, cls in REGIONS.items():
        p, t = np.isin(pred, cls), np.isin(target, cls)
        scores[name] = binary_scores(p, t)
        if surface:
            scores[name].update(zip(SURFACE_METRICS, surface_dice(p, t, SURFACE_TOLERANCES), strict=True))
    return scores


def surface_metrics_in(scores: Iterable[Mapping[str, Mapping[str, object]]]) -> tuple[str, ...]:
    """The `SURFACE_METRICS` that every region of every one of `scores` holds (per-image scores or
    summaries, keyed by region)."""
    items = list(scores)
    return tuple(m for m in SURFACE_METRICS if all(m in s[r] for s in items for r in REGIONS))


def average_score(scores: Mapping[str, Mapping[str, float]]) -> float:
    """The "average evaluation score": mean of every metric in `METRICS` over every region."""
    return float(np.mean([scores[r][m] for r in REGIONS for m in METRICS]))


def summarize(
    per_image: Iterable[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample sd over images of each region's metrics (and surface Dice where every image has
    it), plus the average score (of `METRICS` alone).

    Returns:
        `{region: {metric: {"mean": m, "sd": s}}, "average": {"score": {"mean", "sd"}}}`.
    """
    items = list(per_image)
    if not items:
        raise ValueError("no images to summarise")
    out: dict[str, dict[str, dict[str, float]]] = {}
    surface = surface_metrics_in(items)
    for region in REGIONS:
        out[region] = {}
        for metric in METRICS + surface:
            values = np.array([s[region][metric] for s in items])
            out[region][metric] = _mean_sd(values)
    out["average"] = {"score": _mean_sd(np.array([average_score(s) for s in items]))}
    return out


def _mean_sd(values: np.ndarray) -> dict[str, float]:
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd}
