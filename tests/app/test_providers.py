"""Execution provider choice: CUDA first when it is really usable, the CPU otherwise."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_support import problem, running

from app import inference
from app.config import Settings
from app.errors import ModelLoadError
from app.inference import CPU, CUDA, Segmenter, batch_size_for, inference_workers_for, requested_providers


@pytest.fixture
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(inference, "_preload_cuda_libraries", lambda: None)


def test_cuda_comes_first_when_its_provider_and_a_driver_exist(
        cuda_listed: None, monkeypatch: pytest.MonkeyPatch, settings_for: Callable[..., Settings]) -> None:
    monkeypatch.setattr(inference, "cuda_driver_present", lambda: True)
    providers = requested_providers(settings_for(device="auto", cuda_device_id=1))
    assert providers == [(CUDA, {"device_id": 1}), CPU]


def test_a_listed_cuda_provider_without_a_driver_is_not_tried(
        cuda_listed: None, monkeypatch: pytest.MonkeyPatch, settings_for: Callable[..., Settings]) -> None:
    monkeypatch.setattr(inference, "cuda_driver_present", lambda: False)
    assert requested_providers(settings_for(device="auto")) == [CPU]
    with pytest.raises(ModelLoadError, match="CUDA"):
        requested_providers(settings_for(device="cuda"))


def test_device_cpu_never_asks_for_cuda(cuda_listed: None, settings_for: Callable[..., Settings]) -> None:
    assert requested_providers(settings_for(device="cpu")) == [CPU]


def test_requiring_cuda_where_it_cannot_run_keeps_the_service_unready(
        settings_for: Callable[..., Settings]) -> None:
    if inference.cuda_driver_present() and CUDA in inference.ort.get_available_providers():
        pytest.skip("CUDA is usable here")
    with running(settings_for(device="cuda")) as client:
        problem(client.get("/health/ready"), 503)


@pytest.mark.gpu
def test_on_a_gpu_machine_the_session_runs_on_cuda(settings_for: Callable[..., Settings],
                                                   png_bytes: bytes) -> None:
    if not inference.cuda_driver_present():
        pytest.skip("no NVIDIA driver (libcuda.so.1): the CUDA runtime alone cannot run a session")
    with running(settings_for(device="auto")) as client:
        assert client.get("/health/ready").json()["provider"] == CUDA
        assert client.get("/v1/model").json()["providers"][0] == CUDA
        assert client.post("/v1/segment", files={"file": ("a.png", png_bytes)}).status_code == 200


@pytest.mark.parametrize(("configured", "provider", "expected"), [
    (None, CPU, 1), (None, CUDA, 8), (4, CPU, 4), (2, CUDA, 2),
], ids=["cpu-auto", "cuda-auto", "cpu-set", "cuda-set"])
def test_largest_batch_follows_the_provider_unless_set(configured: int | None, provider: str,
                                                       expected: int) -> None:
    assert batch_size_for(configured, provider) == expected


def test_on_the_cpu_concurrent_requests_run_one_by_one_by_default(
        settings_for: Callable[..., Settings], png_bytes: bytes) -> None:
    with running(settings_for()) as client, ThreadPoolExecutor(4) as pool:
        responses = pool.map(lambda i: client.post("/v1/segment", files={"file": (f"{i}.png", png_bytes)}),
                             range(4))
        assert [r.status_code for r in responses] == [200] * 4
        text = client.get("/metrics").text
    assert "wbc_inference_batch_size_sum 4.0" in text
    assert "wbc_inference_batch_size_count 4.0" in text


@pytest.mark.parametrize(("configured", "provider", "cpus", "expected"), [
    (None, CPU, 2, 2), (None, CPU, 16, 2), (None, CPU, 1, 1), (None, CUDA, 16, 1), (3, CPU, 2, 3),
    (2, CUDA, 8, 2),
], ids=["cpu-auto", "many-cpus", "one-cpu", "cuda-auto", "cpu-set", "cuda-set"])
def test_inference_workers_follow_the_provider_unless_set(configured: int | None, provider: str, cpus: int,
                                                          expected: int) -> None:
    assert inference_workers_for(configured, provider, cpus) == expected


def test_overlapping_runs_use_a_session_with_a_share_of_the_threads(
        settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "available_cpus", lambda: 4)
    segmenter = Segmenter.load(settings_for(intra_op_threads=4, inference_workers=2))
    assert segmenter.workers == 2 and segmenter.shared_session is not None
    assert segmenter.shared_session is not segmenter.session
    x = np.random.default_rng(0).standard_normal((1, 3, *segmenter.input_size)).astype(np.float32)
    alone, overlapping = segmenter.run(x, concurrent=False), segmenter.run(x, concurrent=True)
    assert np.allclose(alone, overlapping, atol=1e-5), "both sessions hold the same model"

    single = Segmenter.load(settings_for(intra_op_threads=4, inference_workers=1))
    assert single.workers == 1 and single.shared_session is None
    assert np.allclose(single.run(x, concurrent=True), alone, atol=1e-5)
