"""`wbc-quantize`: an int8 variant of an exported model, kept only if it segments as well as the fp32 one.

Static quantization with onnxruntime: int8 weights (per output channel) and 8-bit activations whose
ranges are calibrated on training images prepared exactly as the service prepares an upload (resize to
the model size, normalise). Both models then segment the validation split at original resolution
(`evaluate.score_model`) and run side by side for speed. The int8 model is written only when its mean
Dice falls by at most `max_dice_drop` for every region (nucleus, cytoplasm, cell).

It takes and returns float32 like the original, so the service runs it unchanged:
`WBC_MODEL_PATH=weights/model.int8.onnx` (its metadata, `model.int8.json`, is found beside it). The
metadata is the fp32 model's, with its own `file`, `sha256`, `version` (`+int8`), `evaluation` (the int8
scores) and a `quantization` block: settings, calibration images, Dice against fp32, speed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.contract import ModelMetadata, metadata_path, sha256_file
from app.engine.session import session_options
from model_training.data import Sample
from model_training.evaluate import EvaluateConfig, data_config, score_model, select_split
from model_training.loading import LoadedModel, load_model
from model_training.metrics import REGIONS
from model_training.train import load_samples

logger = logging.getLogger(__name__)

FORMATS = ("qdq", "qoperator")
ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class QuantizeConfig:
    """What `wbc-quantize` quantizes, how, and how the result is judged."""

    model: str = "weights/model.onnx"           # fp32 model, its model.json beside it
    out: str | None = None                      # default: model.int8.onnx beside the model
    data: list[str] = field(default_factory=list)   # default: the data recorded in model.json
    calibration_images: int = 128
    calibration_method: str = "minmax"         # entropy and percentile hold every activation in memory
    quant_format: str = "qdq"
    activation_type: str = "uint8"              # uint8 × int8 weights: the VNNI kernels of x86 CPUs
    per_channel: bool = True
    reduce_range: bool = True                   # 7-bit weights: exact on x86 CPUs with or without VNNI
    seed: int = 0
    max_dice_drop: float = 0.003
    batch_sizes: tuple[int, ...] = (1, 8)
    speed_rounds: int = 10
    threads: int = 0                            # onnxruntime threads for the speed runs; 0: every CPU
    force: bool = False                         # write the int8 model even when it is rejected

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.model).with_name("model.int8.onnx")


@dataclass
class QuantizeResult:
    """The verdict, where the model went (None when it was not written) and its metadata."""

    accepted: bool
    path: Path | None
    metadata: ModelMetadata


def pick_calibration(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """`count` samples drawn without replacement, the same for the same names and seed."""
    ordered = sorted(samples, key=lambda s: (s.source, s.name))
    order = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return [ordered[i] for i in sorted(order)]


class TensorReader:
    """onnxruntime's `CalibrationDataReader` over prepared `(1, 3, S, S)` inputs."""

    def __init__(self, input_name: str, tensors: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self._tensors = iter(tensors)

    def get_next(self) -> dict[str, np.ndarray] | None:
        tensor = next(self._tensors, None)
        return None if tensor is None else {self.input_name: tensor}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization warns on the root logger about every integer shape tensor it skips.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_file(source: Path, target: Path, input_name: str, tensors: Sequence[np.ndarray],
                  cfg: QuantizeConfig) -> None:
    """Pre-process (fold, infer shapes) and statically quantize `source` into `target`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quant_format = QuantFormat.QDQ if cfg.quant_format == "qdq" else QuantFormat.QOperator
    activation_type = QuantType.QUInt8 if cfg.activation_type == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the exported padding for odd sizes; ONNX's own can.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), TensorReader(input_name, tensors),
                        quant_format=quant_format, per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                        activation_type=activation_type, calibrate_method=methods[cfg.calibration_method],
                        reduce_range=cfg.reduce_range)


def dice_comparison(fp32: dict[str, Any], int8: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """Mean Dice per region of both models' `score_model` entries, their difference, and the verdict.

    `worst_image_drop` is the largest fall of one image's Dice, for judging whether a small mean hides
    a few badly damaged masks.
    """
    regions: dict[str, Any] = {}
    for region in REGIONS:
        a = np.array([r["scores"][region]["dice"] for r in fp32["per_image"]])
        b = np.array([r["scores"][region]["dice"] for r in int8["per_image"]])
        regions[region] = {"fp32": float(a.mean()), "int8": float(b.mean()),
                           "delta": float(b.mean() - a.mean()), "worst_image_drop": float((a - b).max())}
    accepted = all(r["delta"] >= -max_drop for r in regions.values())
    return {"split": fp32["split"], "image_count": fp32["image_count"], "max_dice_drop": max_drop,
            "dice": regions, "accepted": accepted}


def session(path: Path, threads: int) -> Any:
    """A CPU session with the engine's session options."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def time_side_by_side(paths: dict[str, Path], input_name: str, input_size: int, batch_sizes: Sequence[int],
                      rounds: int, threads: int = 0) -> dict[str, Any]:
    """Median milliseconds per image of each model, runs interleaved so that both see the same load.

    Returns:
        `{"batch_<n>": {label: ms_per_image, ..., "speedup": first label's ms / last label's ms}}`.
    """
    sessions = {label: session(path, threads) for label, path in paths.items()}
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for batch in batch_sizes:
        feed = {input_name: rng.standard_normal((batch, 3, input_size, input_size), dtype=np.float32)}
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for s in sessions.values():
            s.run(None, feed)  # first run allocates
        for _ in range(rounds):
            for label, s in sessions.items():
                started = time.perf_counter()
                s.run(None, feed)
                times[label].append((time.perf_counter() - started) * 1000 / batch)
        medians = {label: float(np.median(t)) for label, t in times.items()}
        values = list(medians.values())
        out[f"batch_{batch}"] = {**medians, "speedup": values[0] / values[-1]}
    return out


def int8_metadata(fp32_meta: ModelMetadata, path: Path, cfg: QuantizeConfig, calibration: list[Sample],
                  int8_entry: dict[str, Any] | None, comparison: dict[str, Any] | None,
                  speed: dict[str, Any] | None) -> ModelMetadata:
    """The int8 model's contract: the fp32 one with its own file, hash, version, scores and a
    `quantization` block whose `validation.accepted` is the Dice gate the engine checks before serving it."""
    import onnxruntime as ort

    keys = ("label", "kind", "sha256", "split", "image_count", "image_counts", "overall", "per_source")
    evaluation = ({k: int8_entry[k] for k in keys if k in int8_entry} if int8_entry else {})
    settings = {k: v for k, v in asdict(cfg).items()
                if k in ("calibration_method", "quant_format", "activation_type", "per_channel",
                         "reduce_range", "seed")}
    return fp32_meta.model_copy(update={
        "file": path.name, "sha256": sha256_file(path), "version": f"{fp32_meta.version}+int8",
        "evaluation": evaluation,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quantization": {
            "method": "static", **settings, "weight_type": "int8", "onnxruntime": ort.__version__,
            "source": {"file": Path(cfg.model).name, "sha256": fp32_meta.sha256},
            "calibration": {"split": "train", "count": len(calibration),
                            "preprocessing": "the engine's InputTransform (as the service)",
                            "images": [f"{s.source}/{s.name}" for s in calibration]},
            "validation": comparison or {}, "speed_cpu": speed or {}}})


def _load_split(model: LoadedModel, cfg: QuantizeConfig) -> tuple[list[Sample], list[Sample]]:
    """The model's training and validation images (its recorded data unless `cfg.data` is given)."""
    train_cfg = data_config(model, EvaluateConfig(models=[], data=list(cfg.data)))
    samples = load_samples(train_cfg)
    return (select_split(samples, "train", train_cfg, model.val_names),
            select_split(samples, "val", train_cfg, model.val_names))


def quantize(cfg: QuantizeConfig) -> QuantizeResult:
    """Quantize, score fp32 and int8 on the validation split, time them, and write the int8 model and
    its metadata to `cfg.out_path` if accepted (or `cfg.force`).

    Raises:
        ValueError: for an unknown format, activation type or calibration method.
    """
    if (cfg.quant_format not in FORMATS or cfg.activation_type not in ACTIVATION_TYPES
            or cfg.calibration_method not in CALIBRATION_METHODS):
        raise ValueError(f"format in {FORMATS}, activation type in {ACTIVATION_TYPES}, "
                         f"calibration method in {CALIBRATION_METHODS}")
    source = Path(cfg.model)
    device = torch.device("cpu")
    fp32 = load_model(f"fp32={source}", device)
    fp32_meta = ModelMetadata.load(metadata_path(source))
    train, val = _load_split(fp32, cfg)
    calibration = pick_calibration(train, cfg.calibration_images, cfg.seed)
    input_name = fp32_meta.input.name
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / cfg.out_path.name
        tensors = [fp32.transform(s.image)[None] for s in calibration]
        quantize_file(source, work, input_name, tensors, cfg)
        int8_metadata(fp32_meta, work, cfg, calibration, None, None, None).write(work.with_suffix(".json"))
        int8 = load_model(f"int8={work}", device)
        fp32_entry, _ = score_model(fp32, val, device)
        int8_entry, _ = score_model(int8, val, device)
        comparison = dice_comparison({**fp32_entry, "split": "val"}, {**int8_entry, "split": "val"},
                                     cfg.max_dice_drop)
        speed = time_side_by_side({"fp32": source, "int8": work}, input_name, fp32.input_size,
                                  cfg.batch_sizes, cfg.speed_rounds, cfg.threads)
        meta = int8_metadata(fp32_meta, work, cfg, calibration, {**int8_entry, "split": "val"}, comparison,
                             speed)
        accepted = bool(comparison["accepted"])
        if not (accepted or cfg.force):
            return QuantizeResult(False, None, meta)
        target = cfg.out_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work, target)
        meta.write(target.with_suffix(".json"))
        return QuantizeResult(accepted, target, meta)


def format_summary(result: QuantizeResult) -> str:
    """The Dice comparison and the speed, as printed by `wbc-quantize`."""
    q = result.metadata.quantization
    lines = [f"{'region':<10} {'fp32':>8} {'int8':>8} {'delta':>9} {'worst image':>12}"]
    for region, d in q["validation"]["dice"].items():
        lines.append(f"{region:<10} {d['fp32']:8.4f} {d['int8']:8.4f} {d['delta']:+9.4f} "
                     f"{-d['worst_image_drop']:+12.4f}")
    for batch, s in q["speed_cpu"].items():
        lines.append(f"{batch}: fp32 {s['fp32']:.1f} ms/image, int8 {s['int8']:.1f} ms/image, "
                     f"{s['speedup']:.2f}× faster")
    verdict = "accepted" if result.accepted else "rejected"
    where = f"wrote {result.path}" if result.path else "nothing written"
    lines.append(f"{verdict} (max Dice drop {q['validation']['max_dice_drop']}); {where}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> QuantizeConfig:
    """Parse the command line of `wbc-quantize` into a `QuantizeConfig`."""
    d = QuantizeConfig()
    p = argparse.ArgumentParser(prog="wbc-quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=d.model, help=f"fp32 model.onnx (default: {d.model})")
    p.add_argument("--out", help="int8 model path (default: model.int8.onnx beside the model)")
    p.add_argument("--data", nargs="+", default=[], help="dataset folders (default: the model's own)")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images)
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=d.calibration_method)
    p.add_argument("--format", dest="quant_format", choices=FORMATS, default=d.quant_format)
    p.add_argument("--activation-type", choices=ACTIVATION_TYPES, default=d.activation_type)
    p.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="one weight scale per tensor instead of per output channel")
    p.add_argument("--full-range", dest="reduce_range", action="store_false",
                   help="8-bit weights instead of 7: only for CPUs with VNNI; on other x86 CPUs the "
                        "8-bit products saturate and the masks break")
    p.add_argument("--seed", type=int, default=d.seed, help="which training images calibrate")
    p.add_argument("--max-dice-drop", type=float, default=d.max_dice_drop)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes))
    p.add_argument("--speed-rounds", type=int, default=d.speed_rounds)
    p.add_argument("--threads", type=int, default=d.threads, help="onnxruntime threads (default: every CPU)")
    p.add_argument("--force", action="store_true", help="write the int8 model even when it is rejected")
    args = vars(p.parse_args(argv))
    return QuantizeConfig(**{**args, "batch_sizes": tuple(args["batch_sizes"])})


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0 when the int8 model was accepted and written, 1 when it was rejected."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = quantize(parse_args(argv))
    print(format_summary(result))
    return 0 if result.accepted else 1


if __name__ == "__main__":
    raise SystemExit(main())
