"""Logits back to the image's own size: separable bilinear resize (align_corners=False), then argmax."""

from __future__ import annotations

import cv2
import numpy as np

# Output elements resized per step: about 1 MiB of float32 per intermediate, whatever the image size.
_BLOCK_ELEMENTS = 1 << 18
#: Up to this many output pixels, OpenCV resizes each class plane whole (three planes of 16 MiB at most);
#: larger images go in row blocks with bounded memory.
_WHOLE_PIXELS = 1 << 22

# The service runs its own worker threads; OpenCV's pool would compete with onnxruntime's for the cores.
cv2.setNumThreads(1)


def axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, as PyTorch's bilinear with align_corners=False.

    Returns:
        `i0`, `i1` (neighbouring source indices) and `w1` (weight of `i1`), each of length `n_out`.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(src.astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    # Not cached: a cache keyed by image size would grow with every new size a client sends.
    return i0, i1, w1


def resize_bilinear(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of `(C, h, w)` float32 to `(C, H, W)` (align_corners=False, no antialiasing)."""
    return _resize_rows(_resize_columns(logits, size[1]), size[0], 0, size[0])


def _resize_columns(logits: np.ndarray, width: int) -> np.ndarray:
    if logits.shape[2] == width:
        return logits
    i0, i1, w1 = axis_weights(logits.shape[2], width)
    left = logits[:, :, i0]
    return left + (logits[:, :, i1] - left) * w1


def _resize_rows(columns: np.ndarray, height: int, start: int, stop: int) -> np.ndarray:
    if columns.shape[1] == height:
        return columns[:, start:stop]
    i0, i1, w1 = axis_weights(columns.shape[1], height)
    top = columns[:, i0[start:stop]]
    return top + (columns[:, i1[start:stop]] - top) * w1[start:stop, None]


def labels_at_size(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class ids at `size` = (H, W) from `(C, h, w)` logits: resize the logits, then take the argmax.

    Resizing is linear, so the differences `logits[c] - logits[0]` are resized instead of the logits
    themselves: one channel less to interpolate, the same argmax (ties go to the lower class, as
    `np.argmax`). Rows are done in blocks so that memory stays small for very large images.

    Returns:
        `(H, W)` uint8 labels.
    """
    height, width = size
    logits = np.asarray(logits, np.float32)
    differences = logits[1:] - logits[0]
    if height * width <= _WHOLE_PIXELS:
        return _labels_whole(differences, size)
    columns = _resize_columns(differences, width)
    labels = np.empty((height, width), np.uint8)
    step = max(1, _BLOCK_ELEMENTS // (columns.shape[0] * width))
    for start in range(0, height, step):
        stop = min(height, start + step)
        _argmax_over_zero(_resize_rows(columns, height, start, stop), labels[start:stop])
    return labels


def _labels_whole(differences: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`labels_at_size` with OpenCV, one class plane at a time: its INTER_LINEAR is PyTorch's bilinear
    with align_corners=False, growing or shrinking (no antialiasing), and contiguous planes keep the
    running argmax to a few branch-free vector passes."""
    height, width = size
    resized = [cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR) for plane in differences]
    # The first plane starts the running argmax; no np.zeros: calloc'ed memory is fresh pages, and
    # faulting them in costs more than the work.
    labels = np.greater(resized[0], 0).view(np.uint8)
    best = np.maximum(resized[0], 0, out=resized[0])
    for c, plane in enumerate(resized[1:], start=2):
        _take(labels, c, np.greater(plane, best))
        np.maximum(best, plane, out=best)
    return labels


def _argmax_over_zero(differences: np.ndarray, out: np.ndarray) -> None:
    """Write into `out` the argmax over `[0, differences[0], differences[1], ...]` per pixel."""
    best = np.zeros(out.shape, np.float32)
    out[...] = 0
    for c in range(differences.shape[0]):
        _take(out, c + 1, differences[c] > best)
        np.maximum(best, differences[c], out=best)


def _take(labels: np.ndarray, label: int, where: np.ndarray) -> None:
    """`labels[where] = label` for a label above every one in `labels` so far: a branch-free maximum,
    several times faster than a masked copy on ragged masks."""
    np.maximum(labels, where.view(np.uint8) * np.uint8(label), out=labels)
