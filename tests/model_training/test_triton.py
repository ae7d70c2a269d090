"""The Triton model repository: its config.pbtxt, read with Triton's own protobuf definitions, against the
ONNX graph it serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from support.service import copy_model

from app.engine.errors import ModelLoadError
from model_training import export, triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")
triton_to_np_dtype = pytest.importorskip("tritonclient.utils").triton_to_np_dtype


def read_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_tensors(values: list[onnx.ValueInfoProto]) -> list[tuple[str, Any, list[int]]]:
    """(name, numpy dtype, dims with -1 where dynamic) of each graph tensor."""
    tensors = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        tensors.append((value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims))
    return tensors


def config_tensors(tensors: list[Any]) -> list[tuple[str, Any, list[int]]]:
    """The same of config.pbtxt's tensors, with the batch dimension Triton adds (-1) put back."""
    names = model_config_pb2.DataType.Name
    return [(t.name, triton_to_np_dtype(names(t.data_type).removeprefix("TYPE_")), [-1, *t.dims])
            for t in tensors]


def test_config_declares_the_graphs_inputs_and_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    written = triton.write_repository(tiny_model_dir / "model.onnx", tmp_path)
    config = read_config(written)
    graph = onnx.load(str(tmp_path / "wbc_unet" / "1" / "model.onnx")).graph
    assert written == tmp_path / "wbc_unet" / "config.pbtxt"
    assert (config.name, config.platform) == ("wbc_unet", "onnxruntime_onnx")
    assert config_tensors(list(config.input)) == graph_tensors(list(graph.input))
    assert config_tensors(list(config.output)) == graph_tensors(list(graph.output))
    assert [t[0] for t in graph_tensors(list(graph.output))] == ["logits"]
    assert graph_tensors(list(graph.output))[0][2][1] == 3, "three classes"


def test_config_batches_dynamically_on_one_gpu_instance(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = read_config(triton.write_repository(tiny_model_dir / "model.onnx", tmp_path))
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    [group] = config.instance_group
    assert (group.count, group.kind) == (1, model_config_pb2.ModelInstanceGroup.KIND_GPU)


def test_repository_holds_the_model_and_its_metadata_unchanged(tiny_model_dir: Path, tmp_path: Path) -> None:
    triton.write_repository(tiny_model_dir / "model.onnx", tmp_path)
    version = tmp_path / "wbc_unet" / "1"
    assert (version / "model.onnx").read_bytes() == (tiny_model_dir / "model.onnx").read_bytes()
    assert (version / "model.json").read_bytes() == (tiny_model_dir / "model.json").read_bytes()


def test_command_writes_a_cpu_repository_with_its_batch_size(tiny_model_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tiny_model_dir / "model.onnx"), str(tmp_path), "--cpu", "--max-batch-size", "16",
            "--name", "wbc"]
    assert triton.main(argv) == 0
    config = read_config(tmp_path / "wbc" / "config.pbtxt")
    assert (config.name, config.max_batch_size) == ("wbc", 16)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert "config.pbtxt" in capsys.readouterr().out


def test_a_model_that_does_not_match_its_metadata_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "model", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        triton.write_repository(model, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_export_writes_the_repository_with_triton(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = tiny_model_dir.parent / "best.pt"  # the checkpoint the tiny model was exported from
    argv = [str(checkpoint), "--out-dir", str(tmp_path / "weights"), "--triton", str(tmp_path / "repo")]
    assert export.main(argv) == 0
    config = read_config(tmp_path / "repo" / "wbc_unet" / "config.pbtxt")
    assert [t.name for t in config.input] == ["image"]
    assert (tmp_path / "repo" / "wbc_unet" / "1" / "model.onnx").read_bytes() == \
        (tmp_path / "weights" / "model.onnx").read_bytes()
