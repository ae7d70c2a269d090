"""`wbc-export`: checkpoint → ONNX (opset ≥ 18, dynamic batch/height/width) + `model.json` metadata.

`model.json` is the contract with the service: export builds an `app.engine.contract.ModelMetadata`
(input name and size, the training normalisation, class order, sha256, opset, training config, the
evaluation scores recorded at export) and writes it; the engine reads the same class back. The parity
check feeds onnxruntime and PyTorch inputs prepared by the engine's `InputTransform`.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.engine.contract import (
    CLASS_NAMES,
    DEFAULT_NORMALIZATION,
    SCHEMA_VERSION,
    STAIN_SCHEMA_VERSION,
    InputSpec,
    ModelMetadata,
    OutputSpec,
    StainNormalization,
    sha256_file,
)
from model_training.ensemble import build_network
from model_training.models import count_parameters
from model_training.transforms import input_transform, stain_of
from model_training.triton import write_repository

logger = logging.getLogger(__name__)

OPSET = 18
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


@dataclass
class ExportConfig:
    checkpoint: str
    out_dir: str = "weights"
    name: str = "wbc-attention-unet"
    version: str = "1.0.0"
    evaluation: str | None = None   # path of an evaluate JSON report whose scores go into model.json
    provenance: str | None = None   # JSON text or path describing the training data
    check_images: tuple[str, ...] = ()
    triton: str | None = None       # also write a Triton model repository there (model_training.triton)


def load_checkpoint(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a `wbc-train` checkpoint (or of an ensemble's, `model_training.ensemble`),
    in eval mode, with its saved state."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = state["config"]
    model = build_network(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), state


def best_epoch(state: dict[str, Any]) -> int | None:
    """The epoch (counted from 1) whose weights a checkpoint holds; None for an ensemble's, whose members
    each have their own (in `config["ensemble"]`)."""
    return None if "ensemble" in state["config"] else int(state["epoch"]) + 1


def export_onnx(model: nn.Module, path: Path | str, input_size: int = 160) -> None:
    """Write `model` as ONNX with dynamic batch, height and width (input `image`, output `logits`)."""
    model = model.eval()
    example = torch.randn(2, 3, input_size, input_size)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=1, max=16384),
            3: torch.export.Dim("width", min=1, max=16384)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                    opset_version=OPSET, dynamo=True, dynamic_shapes=(dims,), verbose=False)
    assert program is not None
    program.save(str(path))


def check_parity(model: nn.Module, onnx_path: Path | str, inputs: Sequence[np.ndarray],
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Run `onnx.checker` and compare onnxruntime with PyTorch on each `(N, 3, H, W)` input.

    Returns:
        The largest absolute logit difference seen.

    Raises:
        ParityError: when it exceeds `tolerance`.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(onnx_path), full_check=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = model(torch.from_numpy(x)).numpy()
            got = session.run(None, {"image": x})[0]
            if got.shape != expected.shape:
                raise ParityError(f"onnxruntime shape {got.shape} != PyTorch {expected.shape}")
            worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise ParityError(f"max |onnxruntime − PyTorch| = {worst:.3g} > {tolerance:g}")
    return worst


def parity_inputs(input_size: int, images: Sequence[str] = (), seed: int = 0,
                  stain: StainNormalization | None = None) -> list[np.ndarray]:
    """Random inputs at the model size and at odd sizes, plus real images prepared as the service does."""
    from PIL import Image

    transform = input_transform(input_size, stain)
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((1, 3, input_size, input_size), dtype=np.float32),
              rng.standard_normal((2, 3, 117, 101), dtype=np.float32)]
    for path in images:
        with Image.open(path) as im:
            inputs.append(transform(im.convert("RGB"))[None])
    return inputs


def build_metadata(cfg: ExportConfig, state: dict[str, Any], model: nn.Module, onnx_path: Path,
                   max_diff: float) -> ModelMetadata:
    """The contract of an exported checkpoint."""
    train_cfg = state["config"]
    size = int(train_cfg["input_size"])
    stain = stain_of(train_cfg)
    epoch = best_epoch(state)
    chosen = {} if epoch is None else {"best_epoch": epoch, "val_mean_dice": float(state["best"])}
    return ModelMetadata(
        schema_version=STAIN_SCHEMA_VERSION if stain else SCHEMA_VERSION,
        name=cfg.name, version=cfg.version, architecture=train_cfg["model"],
        parameters=count_parameters(model), file=onnx_path.name, sha256=sha256_file(onnx_path), opset=OPSET,
        input=InputSpec(name="image", size=(size, size)), output=OutputSpec(name="logits"),
        normalization=DEFAULT_NORMALIZATION, stain=stain,
        classes=list(state.get("classes", CLASS_NAMES)),
        training={**train_cfg, **chosen, "val_names": state.get("val_names", [])},
        data=_read_json_arg(cfg.provenance),
        evaluation=evaluation_entry(_read_json_arg(cfg.evaluation), sha256_file(Path(cfg.checkpoint))),
        export={"parity_max_abs_diff": max_diff, "torch": torch.__version__},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )


def evaluation_entry(report: dict[str, Any], checkpoint_sha256: str) -> dict[str, Any]:
    """The scores of one checkpoint from a `wbc-evaluate` report, without its per-image rows.

    The report's model whose `sha256` is the checkpoint's is taken, or its only model; any other
    JSON document is recorded as it is.

    Raises:
        ValueError: when a report of several models holds none with this checkpoint.
    """
    models = report.get("models")
    if not isinstance(models, list):
        return report
    chosen = [m for m in models if m.get("sha256") == checkpoint_sha256]
    if not chosen and len(models) == 1:
        chosen = models
    if not chosen:
        raise ValueError(f"the evaluation report scores {len(models)} models and none is this checkpoint "
                         f"(sha256 {checkpoint_sha256[:12]}…); evaluate it alone or with its own file")
    model = chosen[0]
    keys = ("label", "kind", "sha256", "split", "image_count", "image_counts", "overall", "per_source")
    return {"created": report.get("created"), "average_score": report.get("average_score"),
            **{k: model[k] for k in keys if k in model}}


def _read_json_arg(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value).read_text() if not value.lstrip().startswith("{") else value
    return json.loads(text)


def export(cfg: ExportConfig) -> ModelMetadata:
    """Export a checkpoint to `out_dir/model.onnx`, check parity, write `out_dir/model.json`."""
    model, state = load_checkpoint(cfg.checkpoint)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    size = int(state["config"]["input_size"])
    export_onnx(model, onnx_path, size)
    max_diff = check_parity(model, onnx_path,
                            parity_inputs(size, cfg.check_images, stain=stain_of(state["config"])))
    meta = build_metadata(cfg, state, model, onnx_path, max_diff)
    meta.write(out / "model.json")
    logger.info("exported %s (%d parameters), parity %.2g", onnx_path, meta.parameters, max_diff)
    if cfg.triton:
        logger.info("wrote %s", write_repository(onnx_path, Path(cfg.triton)))
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wbc-export", description="Export a checkpoint to ONNX + model.json.")
    p.add_argument("checkpoint",
                   help="best.pt written by wbc-train (or an ensemble's, model_training.ensemble)")
    p.add_argument("--out-dir", default="weights")
    p.add_argument("--name", default=ExportConfig.name)
    p.add_argument("--version", default=ExportConfig.version)
    p.add_argument("--evaluation", help="JSON report of wbc-evaluate whose scores to record")
    p.add_argument("--provenance", help="JSON (text or file) describing the training data")
    p.add_argument("--check-images", nargs="*", default=(), help="real images for the parity check")
    p.add_argument("--triton", metavar="DIR", help="also write a Triton model repository (config.pbtxt)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    meta = export(ExportConfig(**{**vars(args), "check_images": tuple(args.check_images)}))
    print(f"wrote {Path(args.out_dir) / meta.file} sha256 {meta.sha256} "
          f"parity {meta.export['parity_max_abs_diff']:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
