"""Segmenter: owns the onnxruntime session; provider choice, preprocessing, batched runs, postprocessing."""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from app import CLASS_NAMES
from app.config import Settings, available_cpus
from app.errors import ModelLoadError
from app.interpolate import labels_at_size
from app.model_meta import ModelMetadata, load_metadata, verify_model_file

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: Most images per run when the settings leave it open. On the CPU a batch of 8 is no faster per image
#: than one image at a time (docs/benchmarks.md), so concurrent requests are not merged there; on a
#: GPU a batch costs little more than one image, and merging is where throughput comes from.
AUTO_BATCH_SIZE = {CUDA: 8, CPU: 1}


def batch_size_for(configured: int | None, provider: str) -> int:
    """The configured largest batch, or the provider's default when none is configured."""
    return configured if configured is not None else AUTO_BATCH_SIZE.get(provider, 1)


def inference_workers_for(configured: int | None, provider: str, cpus: int) -> int:
    """Session runs that may go on at once: the configured number, else one on CUDA (the GPU takes one
    run at a time; batching is what fills it) and two on a CPU with two cores or more (docs/benchmarks.md:
    two single-threaded runs side by side do more than one run on two threads)."""
    if configured is not None:
        return configured
    return 1 if provider == CUDA or cpus < 2 else 2


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is visible to this process (the container runtime mounts libcuda)."""
    if not sys.platform.startswith("linux"):
        return True  # elsewhere onnxruntime's own probe decides
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def requested_providers(settings: Settings) -> list[Any]:
    """Providers to ask onnxruntime for, best first; CUDA only when its provider and a driver exist."""
    if settings.device == "cpu":
        return [CPU]
    if CUDA in ort.get_available_providers() and cuda_driver_present():
        _preload_cuda_libraries()
        return [(CUDA, {"device_id": settings.cuda_device_id}), CPU]
    if settings.device == "cuda":
        raise ModelLoadError("device=cuda, but onnxruntime has no usable CUDA provider here")
    return [CPU]


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip wheels where they are installed that way (a no-op elsewhere)."""
    try:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    except Exception as exc:  # the session's own loading still has its say
        logger.debug("preloading CUDA libraries failed: %r", exc)


def session_options(settings: Settings, intra_op_threads: int | None = None) -> ort.SessionOptions:
    """Thread counts and optimisation level from the settings (`intra_op_threads` overrides theirs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers keep cores busy between runs, which starves decoding and encoding threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_spinning else "0")
    options.log_severity_level = 3
    return options


@dataclass(frozen=True)
class InputTransform:
    """RGB image → `(3, h, w)` float32 network input, exactly as in training.

    Bilinear resize (antialiased when shrinking, as Pillow does it) to the model's input size, then
    `(pixel * scale - mean) / std` per channel, folded here into one multiply-add.
    """

    size: tuple[int, int]  # (height, width)
    gain: np.ndarray  # (3,) scale / std
    offset: np.ndarray  # (3,) -mean / std

    @classmethod
    def from_metadata(cls, metadata: ModelMetadata) -> InputTransform:
        """The transform that `metadata` describes."""
        norm = metadata.normalization
        std = np.asarray(norm.std, np.float32)
        return cls(metadata.input.size, (norm.scale / std).astype(np.float32),
                   (-np.asarray(norm.mean, np.float32) / std).astype(np.float32))

    def __call__(self, image: Image.Image) -> np.ndarray:
        height, width = self.size
        planes: np.ndarray
        if image.size == (width, height):
            planes = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        elif image.width <= width and image.height <= height:
            # Growing, bilinear has no antialiasing to do: OpenCV's is the same arithmetic, several
            # times faster than three Pillow passes.
            pixels = np.asarray(image, dtype=np.float32)
            planes = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        else:
            # Each channel is resized as 32-bit float: Pillow resizing the 8-bit image would round to
            # whole grey levels after each of its two passes, up to one level away from training.
            planes = np.stack([np.asarray(image.getchannel(c).convert("F").resize(
                (width, height), Image.Resampling.BILINEAR)) for c in range(3)])
        return np.ascontiguousarray(planes * self.gain[:, None, None] + self.offset[:, None, None],
                                    dtype=np.float32)


def _open_session(settings: Settings, options: ort.SessionOptions,
                  providers: list[Any]) -> ort.InferenceSession:
    """The onnxruntime session of the settings' model.

    Raises:
        ModelLoadError: onnxruntime cannot load it.
    """
    try:
        return ort.InferenceSession(str(settings.model_path), options, providers=providers)
    except Exception as exc:  # onnxruntime's errors carry no common type
        raise ModelLoadError(f"onnxruntime cannot load {settings.model_path}: {exc}") from exc


class Segmenter:
    """Runs the exported network on images of any size and returns class masks at their own size.

    Everything about the model (input size, normalisation, class order, tensor names) comes from its
    metadata. Masks and logits are returned in the API's class order (`app.CLASS_NAMES`).

    On the CPU with several inference workers there are two sessions of the same model: `session`
    with every intra-op thread, for a run that starts alone, and `shared_session` with a share of
    them, for runs that overlap (onnxruntime runs concurrent calls of one session side by side). A
    lone request thus gets all cores, and a steady stream of them gets each core running its own
    image, which on small images does more than splitting every operator over the cores.
    """

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata,
                 max_batch_size: int | None = None, workers: int = 1,
                 shared_session: ort.InferenceSession | None = None) -> None:
        self.session = session
        self.shared_session = shared_session
        self.metadata = metadata
        self.max_batch_size = batch_size_for(max_batch_size, self.provider)
        self.workers = workers
        self._transform = InputTransform.from_metadata(metadata)
        order = [metadata.classes.index(name) for name in CLASS_NAMES]
        self._order = None if order == list(range(len(order))) else order
        self._check_io()

    @classmethod
    def load(cls, settings: Settings) -> Segmenter:
        """Read the metadata, check the model file's SHA-256, create the session and warm it up.

        Raises:
            ModelLoadError: with the reason, for anything that keeps the model from serving.
        """
        metadata = load_metadata(settings.metadata_file)
        verify_model_file(settings.model_path, metadata)
        session = _open_session(settings, session_options(settings), requested_providers(settings))
        if settings.device == "cuda" and session.get_providers()[0] != CUDA:
            raise ModelLoadError("device=cuda, but the session fell back to the CPU")
        provider = str(session.get_providers()[0])
        workers = inference_workers_for(settings.inference_workers, provider, available_cpus())
        shared = None
        if provider == CPU and workers > 1 and settings.intra_op_threads > 1:
            threads = max(1, settings.intra_op_threads // workers)
            shared = _open_session(settings, session_options(settings, threads), [CPU])
        segmenter = cls(session, metadata, settings.max_batch_size, workers, shared)
        segmenter.warm_up(settings.warmup_runs)
        logger.info("model %s %s loaded on %s, %d inference workers", metadata.name, metadata.version,
                    segmenter.provider, workers)
        return segmenter

    @property
    def provider(self) -> str:
        """The execution provider the session really uses."""
        return str(self.session.get_providers()[0])

    @property
    def providers(self) -> list[str]:
        """All execution providers of the session, in priority order."""
        return [str(p) for p in self.session.get_providers()]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        return self.metadata.input.size

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if self.metadata.input.name not in inputs or self.metadata.output.name not in outputs:
            raise ModelLoadError(f"the model's tensors are {inputs} → {outputs}, but its metadata names "
                                 f"{self.metadata.input.name!r} → {self.metadata.output.name!r}")

    def warm_up(self, runs: int) -> None:
        """Run the batch sizes the service will use, so that the first requests pay no set-up cost.

        Raises:
            ModelLoadError: the output is not `(N, classes, h, w)`.
        """
        height, width = self.input_size
        largest = self.max_batch_size
        sizes = range(1, largest + 1) if self.provider == CUDA else sorted({1, largest})
        for _ in range(runs):
            for n, concurrent in [(n, c) for n in sizes for c in {False, self.shared_session is not None}]:
                logits = self.run(np.zeros((n, 3, height, width), np.float32), concurrent)
                if logits.shape != (n, len(CLASS_NAMES), height, width):
                    raise ModelLoadError(f"the model returned {logits.shape} for an input of "
                                         f"{(n, 3, height, width)}")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image → `(3, h, w)` float32 network input (see `InputTransform`)."""
        return self._transform(image)

    def run(self, images: np.ndarray, concurrent: bool = False) -> np.ndarray:
        """`(N, 3, h, w)` inputs → `(N, C, h, w)` logits in the API's class order.

        Args:
            images: the network inputs.
            concurrent: another run may be going on (see the class docstring): use the shared session.
        """
        session = self.shared_session if concurrent and self.shared_session is not None else self.session
        logits = session.run([self.metadata.output.name], {self.metadata.input.name: images})[0]
        return logits if self._order is None else logits[:, self._order]

    def postprocess(self, logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """`(C, h, w)` logits → `(H, W)` uint8 class ids at `size` = (H, W)."""
        return labels_at_size(logits, size)
