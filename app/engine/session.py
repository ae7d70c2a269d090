"""The model at run time: which file to serve, the onnxruntime session on the best provider, and runs.

Everything about the model (input size, normalisation, class order, tensor names) comes from its
metadata (`app.engine.contract`).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from app.engine.augment import Mode, Setting, check_mode
from app.engine.contract import CLASS_NAMES, ModelMetadata, metadata_path, verify_model_file
from app.engine.errors import ModelLoadError
from app.engine.smear import make_sample
from app.engine.transform import InputTransform

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: Most images per run by provider. On the CPU a batch of 8 is no faster per image than one image at a
#: time (docs/benchmarks.md); on a GPU a batch costs little more than one image.
AUTO_BATCH_SIZE = {CUDA: 8, CPU: 1}

#: Least share of pixels of each drawn crop to which an int8 variant must give the fp32 model's class
#: before it is served. A variant quantized with 8-bit weights gives 0.26–0.52 on x86 CPUs without VNNI
#: (its products saturate); a sound one gives 0.99 or more on either kind of CPU (docs/benchmarks.md).
INT8_MIN_AGREEMENT = 0.98
#: Drawn crops (`smear.make_sample` seeds) of that check.
INT8_CHECK_SEEDS = (0, 1, 2)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(count, math.ceil(quota)) if quota else count)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how to run it.

    Args:
        model_path: the fp32 `model.onnx` (or any variant, served as given).
        metadata_path: its `model.json`; default: found beside the model (`contract.metadata_path`).
        device: "auto" (CUDA when usable), "cuda" (required) or "cpu".
        precision: "auto" serves the gated int8 variant beside an fp32 model on the CPU; "fp32" never.
        max_batch_size: most images per run; default by provider (`AUTO_BATCH_SIZE`).
        inference_workers: runs that may go on at once; default `auto_workers`.
        tta: test-time augmentation (`augment`); "auto": `dihedral` on CUDA, where eight runs of a
            batch cost little, `none` on the CPU.
    """

    model_path: Path
    metadata_path: Path | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cuda_device_id: int = 0
    intra_op_threads: int = 0  # 0: every available CPU
    precision: Literal["auto", "fp32"] = "auto"
    max_batch_size: int | None = None
    inference_workers: int | None = None
    warmup_runs: int = 1
    tta: Setting = "auto"


def auto_workers(on_cpu: bool, metadata: ModelMetadata, cpus: int) -> int:
    """Runs at once when the settings leave it open: one per CPU for an int8 model on the CPU, else one.

    Measured here (docs/benchmarks.md, model 2.0.0 at 224 px): two one-thread runs of the int8 model side
    by side do 1.1-1.3x the work of one two-thread session called from two threads, which in turn serves
    a lone request 1.2-1.4x faster; the default takes the throughput. The fp32 model scales with
    threads (34.0 → 18.3 ms), so one run with every thread serves it as well and a lone request twice as
    fast. A GPU takes one run at a time; batching is what fills it.
    """
    return max(1, cpus) if on_cpu and metadata.quantization else 1


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is visible to this process (the container runtime mounts libcuda)."""
    if not sys.platform.startswith("linux"):
        return True  # elsewhere onnxruntime's own probe decides
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def requested_providers(device: str, cuda_device_id: int = 0) -> list[Any]:
    """Providers to ask onnxruntime for, best first; CUDA only when its provider and a driver exist.

    Raises:
        ModelLoadError: `device="cuda"` where CUDA cannot be used.
    """
    if device == "cpu":
        return [CPU]
    if CUDA in ort.get_available_providers() and cuda_driver_present():
        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from pip wheels, where installed that way
            try:
                ort.preload_dlls()
            except Exception as exc:  # the session's own loading still has its say
                logger.debug("preloading CUDA libraries failed: %r", exc)
        return [(CUDA, {"device_id": cuda_device_id}), CPU]
    if device == "cuda":
        raise ModelLoadError("device=cuda, but onnxruntime has no usable CUDA provider here")
    return [CPU]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """Sequential execution, every graph optimisation, `intra_op_threads` (0: every available CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or available_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers keep cores busy between runs, which starves decoding and encoding threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def served_file(config: ModelConfig, on_cpu: bool) -> Path:
    """The file to serve: on the CPU with `precision="auto"`, the int8 variant beside an fp32 model
    (`model.int8.onnx`) when its metadata records a passed Dice gate; otherwise the configured file."""
    path = config.model_path
    if not on_cpu or config.precision != "auto" or config.metadata_path or ".int8" in path.suffixes:
        return path
    variant = path.with_name(f"{path.stem}.int8{path.suffix}")
    if not (variant.is_file() and variant.with_suffix(".json").is_file()):
        return path
    try:
        gate = ModelMetadata.load(variant.with_suffix(".json")).int8_gate_passed
    except ModelLoadError as exc:
        logger.warning("ignoring the int8 variant %s: %s", variant, exc)
        return path
    return variant if gate else path


def int8_agreement(int8: ort.InferenceSession, fp32: ort.InferenceSession, metadata: ModelMetadata,
                   images: Sequence[np.ndarray] = ()) -> float:
    """The least share of pixels, over `images` (`(H, W, 3)` uint8; default: drawn smear-like crops,
    `INT8_CHECK_SEEDS`), to which the int8 session gives the fp32 session's class; one image per run,
    as the CPU serves them."""
    height, width = metadata.input.size
    transform = InputTransform.from_metadata(metadata)
    feed, output = metadata.input.name, metadata.output.name
    images = images or [make_sample((height, width), seed)[0] for seed in INT8_CHECK_SEEDS]
    worst = 1.0
    for image in images:
        x = transform(image)[None]
        a, b = (session.run([output], {feed: x})[0].argmax(1) for session in (fp32, int8))
        worst = min(worst, float((a == b).mean()))
    return worst


def _tta_mode(setting: Setting, provider: str, metadata: ModelMetadata) -> Mode:
    size = (int(metadata.input.size[0]), int(metadata.input.size[1]))
    auto: Mode = ("dihedral" if size[0] == size[1] else "mirror") if provider == CUDA else "none"
    mode = auto if setting == "auto" else setting
    try:
        check_mode(mode, size)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    return mode


def _session(path: Path, threads: int, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime's errors carry no common type
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc


def _fp32_beside(variant: Path) -> Path | None:
    """The fp32 `model.onnx` an int8 `model.int8.onnx` was made from, if it lies beside it."""
    if ".int8" not in variant.suffixes:
        return None
    fp32 = variant.with_name(variant.name.replace(".int8", ""))
    return fp32 if fp32.is_file() else None


def _int8_or_fp32(variant: Path, fp32_path: Path, providers: list[Any],
                  threads: int) -> tuple[Path, ModelMetadata | None, float | None]:
    """The file to serve of an int8 variant and its fp32 model, its metadata (already checked against
    the file; None when the check failed before it was), and the variant's `int8_agreement`.

    The variant is served only when it was made from this fp32 file (`quantization.source.sha256`) and
    agrees with it on this CPU (`INT8_MIN_AGREEMENT`); otherwise, and when anything about the check
    fails, the fp32 model is served with a warning that says why: the int8 variant is an optimisation,
    never a reason not to start.
    """
    try:
        metadata = ModelMetadata.load(metadata_path(variant))
        verify_model_file(variant, metadata)
        fp32_meta = ModelMetadata.load(metadata_path(fp32_path))
        verify_model_file(fp32_path, fp32_meta)
        source = metadata.quantization.get("source", {}).get("sha256")
        if source != fp32_meta.sha256:
            logger.warning("not serving %s: it was made from another model (sha256 %s), not from %s (%s); "
                           "serving %s. Run wbc-quantize on it again.", variant.name, str(source)[:12],
                           fp32_path.name, fp32_meta.sha256[:12], fp32_path.name)
            return fp32_path, fp32_meta, None
        agreement = int8_agreement(_session(variant, threads, providers),
                                   _session(fp32_path, threads, providers), metadata)
    except Exception as exc:  # any failure of the optional variant falls back to fp32
        logger.warning("not serving %s: checking it against %s failed (%s); serving %s", variant.name,
                       fp32_path.name, exc, fp32_path.name)
        return fp32_path, None, None
    if agreement < INT8_MIN_AGREEMENT:
        logger.warning("not serving %s: on this CPU it gives the fp32 model's class to only %.1f %% of the "
                       "pixels of a drawn crop (%.0f %% needed), so %s is served. Quantize it again with "
                       "wbc-quantize, which keeps weights to 7 bits.", variant.name, 100 * agreement,
                       100 * INT8_MIN_AGREEMENT, fp32_path.name)
        return fp32_path, fp32_meta, agreement
    logger.info("%s agrees with %s on %.2f %% of the pixels of drawn crops", variant.name, fp32_path.name,
                100 * agreement)
    return variant, metadata, agreement


class Model:
    """An onnxruntime session of one exported model and its metadata: `(N, 3, h, w)` → logits.

    Logits come back in the API's class order (`CLASS_NAMES`) whatever order the model uses. `run` may
    be called from `workers` threads at once (onnxruntime sessions are safe for concurrent runs).
    """

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, path: Path,
                 max_batch_size: int | None = None, workers: int = 1) -> None:
        self.session = session
        self.metadata = metadata
        self.path = path
        self.workers = workers
        self.max_batch_size = max_batch_size or AUTO_BATCH_SIZE.get(self.provider, 1)
        #: `int8_agreement` of the int8 variant at start-up, when the CPU was to serve one; else None.
        self.int8_agreement: float | None = None
        #: The test-time augmentation the engine applies to this model's runs (`augment`).
        self.tta: Mode = "none"
        order = [metadata.classes.index(name) for name in CLASS_NAMES]
        self._order = None if order == list(range(len(order))) else order
        self._check_io()

    @classmethod
    def open(cls, config: ModelConfig) -> Model:
        """Choose the file, check its SHA-256 against its metadata, create the session, warm it up.

        Raises:
            ModelLoadError: with the reason, for anything that keeps the model from serving.
        """
        providers = requested_providers(config.device, config.cuda_device_id)
        on_cpu = providers == [CPU]
        path = served_file(config, on_cpu)
        metadata, agreement = None, None
        cpus = config.intra_op_threads or available_cpus()
        # An int8 variant, chosen by `served_file` or named directly, is checked against its fp32 model.
        fp32 = config.model_path if path != config.model_path else _fp32_beside(path)
        if on_cpu and fp32 is not None and not config.metadata_path:
            path, metadata, agreement = _int8_or_fp32(path, fp32, providers, cpus)
        if metadata is None:
            metadata = ModelMetadata.load(config.metadata_path or metadata_path(path))
            verify_model_file(path, metadata)
        workers = config.inference_workers or auto_workers(on_cpu, metadata, cpus)
        # Concurrent runs of one session share its thread pool; each gets its share of the cores.
        threads = max(1, cpus // workers) if on_cpu else cpus
        session = _session(path, threads, providers)
        if config.device == "cuda" and session.get_providers()[0] != CUDA:
            raise ModelLoadError("device=cuda, but the session fell back to the CPU")
        model = cls(session, metadata, path, config.max_batch_size, workers)
        model.int8_agreement = agreement
        model.tta = _tta_mode(config.tta, model.provider, metadata)
        model.warm_up(config.warmup_runs)
        logger.info("model %s %s (%s) loaded on %s, %d run(s) at once on %d thread(s) each", metadata.name,
                    metadata.version, path.name, model.provider, workers, threads)
        return model

    @property
    def provider(self) -> str:
        """The execution provider the session really uses."""
        return str(self.session.get_providers()[0])

    @property
    def providers(self) -> list[str]:
        """All execution providers of the session, in priority order."""
        return [str(p) for p in self.session.get_providers()]

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if self.metadata.input.name not in inputs or self.metadata.output.name not in outputs:
            raise ModelLoadError(f"the model's tensors are {inputs} → {outputs}, but its metadata names "
                                 f"{self.metadata.input.name!r} → {self.metadata.output.name!r}")

    def warm_up(self, runs: int) -> None:
        """Run the batch sizes that will be used, so that the first requests pay no set-up cost.

        Raises:
            ModelLoadError: the output is not `(N, classes, h, w)`.
        """
        height, width = self.metadata.input.size
        largest = self.max_batch_size
        sizes = range(1, largest + 1) if self.provider == CUDA else sorted({1, largest})
        for _ in range(runs):
            for n in sizes:
                logits = self.run(np.zeros((n, 3, height, width), np.float32))
                if logits.shape != (n, len(CLASS_NAMES), height, width):
                    raise ModelLoadError(f"the model returned {logits.shape} for an input of "
                                         f"{(n, 3, height, width)}")

    def run(self, images: np.ndarray) -> np.ndarray:
        """`(N, 3, h, w)` float32 inputs → `(N, C, h, w)` logits in the API's class order, in runs of at
        most `max_batch_size` images."""
        outputs = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start:start + self.max_batch_size]
            feed = {self.metadata.input.name: chunk}
            outputs.append(self.session.run([self.metadata.output.name], feed)[0])
        logits = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return logits if self._order is None else logits[:, self._order]
