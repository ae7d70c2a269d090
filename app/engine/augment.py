"""Test-time augmentation: every batch of windows also runs mirrored (`mirror`, as nnU-Net does at
inference) or under all eight symmetries of the square (`dihedral`: mirrored and transposed; a smear has
no up or right). Each run's class probabilities are mapped back and averaged.

The runs go one after another through the same `infer`, so memory holds one batch's inputs and logits
plus the running sum, not eight batches. The result stays in `Infer`'s form: log-probabilities, which
every later step (argmax, softmax scores) reads as logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from app.engine.cells import Infer

Mode = Literal["none", "mirror", "dihedral"]
MODES: tuple[Mode, ...] = ("none", "mirror", "dihedral")

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


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def augmented(infer: Infer, mode: Mode) -> Infer:
    """`infer` with test-time augmentation `mode` (`infer` itself for `none`); the run time reported
    is the sum of the runs'."""
    if mode == "none":
        return infer
    pairs = symmetries(mode)

    def run(images: np.ndarray) -> tuple[np.ndarray, float]:
        total: np.ndarray | None = None
        run_ms = 0.0
        for forward, back in pairs:
            logits, ms = infer(np.ascontiguousarray(forward(images)))
            probabilities = _softmax(back(logits).astype(np.float32, copy=False))
            total = probabilities if total is None else total + probabilities
            run_ms += ms
        assert total is not None
        return np.log(np.maximum(total / len(pairs), 1e-7)), run_ms

    return run
