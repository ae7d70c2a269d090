"""Test-time augmentation: every batch of windows also runs mirrored (`mirror`, as nnU-Net does at
inference) or under all eight symmetries of the square (`dihedral`: mirrored and transposed; a smear has
no up or right). Each run's logits are mapped back and averaged, as nnU-Net averages its mirrored runs.

All the symmetries of a batch go to `infer` as one stacked batch, so the service's batcher sees one job
per batch of windows (no extra queue waits) and fills its model runs; memory holds the stacked inputs
and logits of one batch of windows (`cells.RUN_CHUNK` windows × the runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from app.engine.cells import Infer

Mode = Literal["none", "mirror", "dihedral"]
MODES: tuple[Mode, ...] = ("none", "mirror", "dihedral")
#: What a deployment sets (`WBC_TTA`): a mode, or "auto" (the engine picks by provider).
Setting = Literal["auto", "none", "mirror", "dihedral"]

_Map = Callable[[np.ndarray], np.ndarray]


def _flip(axes: tuple[int, ...]) -> _Map:
    return (lambda x: x) if not axes else (lambda x: np.flip(x, axes))


def symmetries(mode: Mode) -> list[tuple[_Map, _Map]]:
    """`(forward, back)` pairs on `(N, C, H, W)` arrays: `back(f(forward(x)))` is `f(x)` for a model
    `f` that commutes with the symmetry. The identity comes first."""
    if mode == "none":
        return [(_flip(()), _flip(()))]
    flips = [_flip(axes) for axes in ((), (3,), (2,), (2, 3))]
    pairs = [(f, f) for f in flips]  # a mirroring undoes itself
    if mode == "dihedral":
        def transposed(flip: _Map) -> tuple[_Map, _Map]:
            return (lambda x: flip(x).swapaxes(2, 3)), (lambda y: flip(y.swapaxes(2, 3)))
        pairs += [transposed(f) for f in flips]
    return pairs


def check_mode(mode: Mode, size: tuple[int, int]) -> None:
    """Raise ValueError for an unknown mode, or `dihedral` on a model whose input is not square."""
    if mode not in MODES:
        raise ValueError(f"test-time augmentation must be one of {MODES}, not {mode!r}")
    if mode == "dihedral" and size[0] != size[1]:
        raise ValueError(f"dihedral test-time augmentation needs a square model input, not "
                         f"{size[0]}×{size[1]}")


def augmented(infer: Infer, mode: Mode) -> Infer:
    """`infer` with test-time augmentation `mode` (`infer` itself for `none`)."""
    if mode == "none":
        return infer
    pairs = symmetries(mode)

    def run(images: np.ndarray) -> tuple[np.ndarray, float]:
        count = len(images)
        stacked = np.concatenate([forward(images) for forward, _ in pairs])
        logits, run_ms = infer(stacked)
        total = np.zeros((count, *logits.shape[1:]), np.float32)
        for k, (_, back) in enumerate(pairs):
            total += back(logits[k * count:(k + 1) * count])
        total /= len(pairs)
        return total, run_ms

    return run
