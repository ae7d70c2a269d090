"""The model at run time: provider choice, which file is served (int8 on the CPU when gated), batch size."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support.service import problem, running

from app.api.settings import Settings
from app.engine import ModelConfig, session
from app.engine.contract import ModelMetadata, sha256_file
from app.engine.errors import ModelLoadError
from app.engine.session import AUTO_BATCH_SIZE, CPU, CUDA, Model, requested_providers, served_file


@pytest.fixture
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.delattr(session.ort, "preload_dlls", raising=False)


def test_cuda_comes_first_when_its_provider_and_a_driver_exist(cuda_listed: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "cuda_driver_present", lambda: True)
    assert requested_providers("auto", cuda_device_id=1) == [(CUDA, {"device_id": 1}), CPU]


def test_a_listed_cuda_provider_without_a_driver_is_not_tried(cuda_listed: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "cuda_driver_present", lambda: False)
    assert requested_providers("auto") == [CPU]
    with pytest.raises(ModelLoadError, match="CUDA"):
        requested_providers("cuda")


def test_device_cpu_never_asks_for_cuda(cuda_listed: None) -> None:
    assert requested_providers("cpu") == [CPU]


def test_requiring_cuda_where_it_cannot_run_keeps_the_service_unready(
        settings_for: Callable[..., Settings]) -> None:
    if session.cuda_driver_present() and CUDA in session.ort.get_available_providers():
        pytest.skip("CUDA is usable here")
    with running(settings_for(device="cuda")) as client:
        problem(client.get("/health/ready"), 503)


@pytest.mark.gpu
def test_on_a_gpu_machine_the_session_runs_on_cuda_with_the_fp32_model(settings_for: Callable[..., Settings],
                                                                      png_bytes: bytes) -> None:
    if not session.cuda_driver_present():
        pytest.skip("no NVIDIA driver (libcuda.so.1): the CUDA runtime alone cannot run a session")
    with running(settings_for(device="auto")) as client:
        assert client.get("/health/ready").json()["provider"] == CUDA
        model = client.get("/v1/model").json()
        assert model["providers"][0] == CUDA and model["file"] == "model.onnx"
        assert client.post("/v1/segment", files={"file": ("a.png", png_bytes)}).status_code == 200


def test_largest_batch_follows_the_provider_unless_set(tiny_model_dir: Path) -> None:
    path = tiny_model_dir / "model.onnx"
    assert Model.open(ModelConfig(path, device="cpu", warmup_runs=0)).max_batch_size == AUTO_BATCH_SIZE[CPU]
    assert Model.open(ModelConfig(path, device="cpu", max_batch_size=4, warmup_runs=0)).max_batch_size == 4
    assert AUTO_BATCH_SIZE[CUDA] > AUTO_BATCH_SIZE[CPU]


def test_a_run_larger_than_the_batch_size_goes_in_chunks_with_the_same_logits(tiny_model_dir: Path) -> None:
    model = Model.open(ModelConfig(tiny_model_dir / "model.onnx", device="cpu", max_batch_size=2))
    x = np.random.default_rng(0).standard_normal((5, 3, *model.metadata.input.size)).astype(np.float32)
    chunked = model.run(x)
    assert chunked.shape[0] == 5
    assert np.allclose(chunked[4], model.run(x[4:])[0], atol=1e-5)


def test_on_the_cpu_concurrent_requests_run_one_by_one_by_default(
        settings_for: Callable[..., Settings], png_bytes: bytes) -> None:
    with running(settings_for()) as client, ThreadPoolExecutor(4) as pool:
        responses = pool.map(lambda i: client.post("/v1/segment", files={"file": (f"{i}.png", png_bytes)}),
                             range(4))
        assert [r.status_code for r in responses] == [200] * 4
        text = client.get("/metrics").text
    images = re.search(r"^wbc_inference_batch_size_sum (\S+)$", text, re.MULTILINE)
    runs = re.search(r"^wbc_inference_batch_size_count (\S+)$", text, re.MULTILINE)
    assert images and runs and float(runs.group(1)) >= 4
    assert images.group(1) == runs.group(1), "every run held one image"


def _negated(source: Path, target: Path) -> None:
    """`source` with its logits negated: every pixel's class changes, as in a variant whose int8 products
    saturate on the CPU that runs it."""
    import onnx

    graph_model = onnx.load(str(source))
    output = graph_model.graph.output[0].name
    for node in graph_model.graph.node:
        node.output[:] = [f"{output}_raw" if name == output else name for name in node.output]
    graph_model.graph.node.append(onnx.helper.make_node("Neg", [f"{output}_raw"], [output]))
    onnx.save(graph_model, str(target))


def _with_int8_variant(tiny_model_dir: Path, folder: Path, accepted: bool | None,
                       broken: bool = False) -> Path:
    """A model folder with the tiny model as `model.onnx` and a copy of it as `model.int8.onnx` whose
    metadata records the given gate verdict (None: no quantization block at all); `broken`: the copy's
    logits are negated."""
    folder.mkdir()
    shutil.copy(tiny_model_dir / "model.onnx", folder / "model.onnx")
    shutil.copy(tiny_model_dir / "model.json", folder / "model.json")
    if broken:
        _negated(tiny_model_dir / "model.onnx", folder / "model.int8.onnx")
    else:
        shutil.copy(tiny_model_dir / "model.onnx", folder / "model.int8.onnx")
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    meta.update(file="model.int8.onnx", version=meta["version"] + "+int8",
                sha256=sha256_file(folder / "model.int8.onnx"))
    if accepted is not None:
        source = {"file": "model.onnx", "sha256": sha256_file(folder / "model.onnx")}
        meta["quantization"] = {"validation": {"accepted": accepted}, "source": source}
    (folder / "model.int8.json").write_text(json.dumps(meta))
    return folder / "model.onnx"


@pytest.mark.parametrize(("accepted", "precision", "device", "expected"), [
    (True, "auto", "cpu", "model.int8.onnx"),
    (False, "auto", "cpu", "model.onnx"),
    (None, "auto", "cpu", "model.onnx"),
    (True, "fp32", "cpu", "model.onnx"),
], ids=["gate-passed", "gate-failed", "no-gate", "forced-fp32"])
def test_the_cpu_serves_the_int8_variant_only_when_its_gate_passed(
        tiny_model_dir: Path, tmp_path: Path, accepted: bool | None, precision: str, device: str,
        expected: str) -> None:
    path = _with_int8_variant(tiny_model_dir, tmp_path / "m", accepted)
    config = ModelConfig(path, device=device, precision=precision)  # type: ignore[arg-type]
    assert served_file(config, on_cpu=True).name == expected
    assert served_file(config, on_cpu=False).name == "model.onnx", "CUDA serves fp32"


def test_the_service_says_which_model_file_and_version_it_serves(
        tiny_model_dir: Path, tmp_path: Path, settings_for: Callable[..., Settings],
        png_bytes: bytes) -> None:
    path = _with_int8_variant(tiny_model_dir, tmp_path / "m", accepted=True)
    with running(settings_for(model_path=path, device="cpu")) as client:
        ready, model = client.get("/health/ready").json(), client.get("/v1/model").json()
        result = client.post("/v1/segment", files={"file": ("a.png", png_bytes)}).json()
    assert ready["version"].endswith("+int8") and model["file"] == "model.int8.onnx"
    assert result["model"]["version"] == ready["version"]
    with running(settings_for(model_path=path, device="cpu", precision="fp32")) as client:
        assert client.get("/v1/model").json()["file"] == "model.onnx"
        assert not client.get("/health/ready").json()["version"].endswith("+int8")


def test_an_int8_variant_that_disagrees_with_fp32_on_this_cpu_is_not_served(
        tiny_model_dir: Path, tmp_path: Path, settings_for: Callable[..., Settings], png_bytes: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    sound = Model.open(ModelConfig(_with_int8_variant(tiny_model_dir, tmp_path / "ok", accepted=True),
                                   device="cpu", warmup_runs=0))
    assert sound.path.name == "model.int8.onnx" and sound.int8_agreement == 1.0
    path = _with_int8_variant(tiny_model_dir, tmp_path / "m", accepted=True, broken=True)
    assert served_file(ModelConfig(path), on_cpu=True).name == "model.int8.onnx", "its gate passed"
    with caplog.at_level(logging.WARNING, logger="app"), \
            running(settings_for(model_path=path, device="cpu")) as client:
        model = client.get("/v1/model").json()
        result = client.post("/v1/segment", files={"file": ("a.png", png_bytes)}).json()
    assert model["file"] == "model.onnx" and not model["version"].endswith("+int8")
    assert model["int8_agreement"] < session.INT8_MIN_AGREEMENT
    assert result["model"]["version"] == model["version"]
    assert any("not serving model.int8.onnx" in r.getMessage() for r in caplog.records)


def test_a_variant_made_from_another_model_or_failing_its_check_is_not_served(
        tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = _with_int8_variant(tiny_model_dir, tmp_path / "other", accepted=True)
    meta = json.loads((tmp_path / "other" / "model.int8.json").read_text())
    meta["quantization"]["source"]["sha256"] = "0" * 64
    (tmp_path / "other" / "model.int8.json").write_text(json.dumps(meta))
    failing = _with_int8_variant(tiny_model_dir, tmp_path / "failing", accepted=True)
    meta = json.loads((tmp_path / "failing" / "model.int8.json").read_text())
    meta["output"]["name"] = "no_such_tensor"
    (tmp_path / "failing" / "model.int8.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="app"):
        for path in (other, failing):
            model = Model.open(ModelConfig(path, device="cpu", warmup_runs=0))
            assert model.path.name == "model.onnx" and model.int8_agreement is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "made from another model" in messages and "checking it against model.onnx failed" in messages


def test_a_variant_named_directly_is_checked_when_its_fp32_model_is_beside_it(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    _with_int8_variant(tiny_model_dir, tmp_path / "m", accepted=True, broken=True)
    named = ModelConfig(tmp_path / "m" / "model.int8.onnx", device="cpu", warmup_runs=0)
    assert Model.open(named).path.name == "model.onnx", "broken on this CPU: fp32 instead"
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model.int8.onnx", "model.int8.json"):
        shutil.copy(tmp_path / "m" / name, alone / name)
    model = Model.open(ModelConfig(alone / "model.int8.onnx", device="cpu", warmup_runs=0))
    assert model.path.name == "model.int8.onnx" and model.int8_agreement is None, "nothing to check against"


def test_a_variant_with_broken_metadata_is_ignored_not_fatal(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _with_int8_variant(tiny_model_dir, tmp_path / "m", accepted=True)
    (tmp_path / "m" / "model.int8.json").write_text("{")
    assert served_file(ModelConfig(path), on_cpu=True).name == "model.onnx"
    assert ModelMetadata.for_model(path).file == "model.onnx"


@pytest.mark.parametrize(("quantized", "on_cpu", "expected"),
                         [(True, True, 4), (False, True, 1), (True, False, 1)],
                         ids=["int8-cpu", "fp32-cpu", "int8-cuda-provider"])
def test_int8_on_the_cpu_runs_one_session_call_per_cpu_side_by_side(tiny_model_dir: Path, quantized: bool,
                                                                    on_cpu: bool, expected: int) -> None:
    meta = ModelMetadata.for_model(tiny_model_dir / "model.onnx")
    if quantized:
        meta = meta.model_copy(update={"quantization": {"validation": {"accepted": True}}})
    assert session.auto_workers(on_cpu, meta, cpus=4) == expected


def test_concurrent_runs_of_one_session_give_each_caller_its_own_logits(tiny_model_dir: Path) -> None:
    model = Model.open(ModelConfig(tiny_model_dir / "model.onnx", device="cpu", intra_op_threads=2,
                                   inference_workers=2))
    assert model.workers == 2
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, 3, *model.metadata.input.size)).astype(np.float32) for _ in range(6)]
    alone = [model.run(x) for x in inputs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(model.run, inputs))
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(alone, together, strict=True))
