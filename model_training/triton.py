"""A Triton Inference Server model repository for the network: `DIR/wbc_unet/config.pbtxt` and
`DIR/wbc_unet/1/model.onnx` (with its `model.json` beside it).

Triton serves only the network: `(N, 3, h, w)` float32 windows in, `(N, 3, h, w)` logits out, batched
across clients by its dynamic batcher. Decoding, finding the leukocytes, cutting their windows, stitching,
measuring and encoding stay in this service's engine (`app.engine`), which a later step can point at
Triton as a remote runner (the engine's `infer` hook) instead of running onnxruntime in process.

The tensors' names, types and dimensions are read from the ONNX graph, so that Triton's own check of the
configuration against the model passes: height and width stay -1 as the graph has them (the engine only
ever sends windows at `model.json`'s input size, which Triton batches together). The file is checked
against its `model.json` (sha256) before it is copied.

    wbc-export runs/x/best.pt --triton triton_models
    python -m model_training.triton weights/model.onnx triton_models [--cpu]
    tritonserver --model-repository=triton_models
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from app.engine.contract import ModelMetadata, metadata_path, verify_model_file

#: ONNX element types → Triton data types (those an exported segmentation network may have).
TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.UINT8: "TYPE_UINT8",
                onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT32: "TYPE_INT32",
                onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonConfig:
    """How Triton should serve the network.

    Args:
        name: the model's directory and name in Triton.
        max_batch_size: most windows of one run (the service batches 8 on a GPU by default).
        max_queue_delay_us: how long the dynamic batcher waits for more windows (the service: 5 ms).
        kind: `KIND_GPU`, or `KIND_CPU` where there is no GPU.
    """

    name: str = "wbc_unet"
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    kind: str = "KIND_GPU"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as Triton sees it: dims without the batch dimension, -1 where dynamic."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def tensor_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs, each with a dynamic batch dimension taken off.

    Raises:
        ValueError: a tensor's first dimension is fixed (Triton's batching needs it dynamic) or its type
            has no Triton equivalent here.
    """
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims or dims[0] != -1:
            raise ValueError(f"{value.name}: the first dimension must be a dynamic batch, got {dims}")
        if tensor.elem_type not in TRITON_TYPES:
            raise ValueError(f"{value.name}: ONNX element type {tensor.elem_type} has no Triton type here")
        return TensorSpec(value.name, TRITON_TYPES[tensor.elem_type], tuple(dims[1:]))

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]


def config_text(meta: ModelMetadata, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                config: TritonConfig) -> str:
    """`config.pbtxt` (protobuf text of Triton's `inference.ModelConfig`)."""
    def tensors(specs: Sequence[TensorSpec]) -> str:
        return ",\n".join(f'  {{ name: "{s.name}" data_type: {s.data_type} dims: [ '
                          f'{", ".join(map(str, s.dims))} ] }}' for s in specs)

    preferred = sorted({max(1, config.max_batch_size // 2), config.max_batch_size})
    return (
        f"# {meta.name} {meta.version} ({meta.architecture}), sha256 {meta.sha256}\n"
        f"# The network only: the wbc-segmenter engine prepares the windows and reads the logits.\n"
        f'name: "{config.name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {config.max_batch_size}\n'
        f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}\n"
        f"# KIND_CPU (and a count of about the cores / intra-op threads) where the server has no GPU.\n"
        f"instance_group [ {{ count: 1 kind: {config.kind} }} ]\n")


def write_repository(model_path: Path, out_dir: Path, config: TritonConfig | None = None) -> Path:
    """Write `out_dir/<name>/config.pbtxt` and `out_dir/<name>/1/model.onnx` (+ `model.json`).

    Returns:
        The `config.pbtxt` written.

    Raises:
        ModelLoadError: the model's metadata is missing or its sha256 is not the file's.
        ValueError: see `tensor_specs`.
    """
    config = config or TritonConfig()
    meta = ModelMetadata.for_model(model_path)
    verify_model_file(model_path, meta)
    inputs, outputs = tensor_specs(model_path)
    version_dir = out_dir / config.name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, version_dir / "model.onnx")
    shutil.copyfile(metadata_path(model_path), version_dir / "model.json")
    target = out_dir / config.name / "config.pbtxt"
    target.write_text(config_text(meta, inputs, outputs, config), encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_training.triton",
                                description="Write a Triton model repository for an exported model.")
    p.add_argument("model", type=Path, help="an exported model.onnx (its model.json beside it)")
    p.add_argument("out_dir", type=Path, help="the model repository (tritonserver --model-repository)")
    p.add_argument("--name", default=TritonConfig.name)
    p.add_argument("--max-batch-size", type=int, default=TritonConfig.max_batch_size)
    p.add_argument("--cpu", action="store_true", help="instance_group KIND_CPU instead of KIND_GPU")
    args = p.parse_args(argv)
    if args.max_batch_size < 1:
        p.error("--max-batch-size must be at least 1 (Triton batches along the first dimension)")
    config = TritonConfig(args.name, args.max_batch_size, kind="KIND_CPU" if args.cpu else "KIND_GPU")
    print(f"wrote {write_repository(args.model, args.out_dir, config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
