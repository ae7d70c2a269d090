"""Health, readiness, model metadata, metrics and the framework's own endpoints."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.service import TINY_INPUT, copy_model, problem, running, upload

from app.api.main import begin_shutdown
from app.api.settings import Settings
from app.engine.contract import sha256_file


def test_live_answers_ok(client: TestClient) -> None:
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_names_the_model_and_the_provider_in_use(client: TestClient) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model": "wbc-tiny", "version": "0.0.1",
                               "provider": "CPUExecutionProvider"}


def test_model_endpoint_reports_the_metadata_and_providers(client: TestClient, tiny_model_dir: Path) -> None:
    info = client.get("/v1/model").json()
    assert info["name"] == "wbc-tiny"
    assert info["architecture"] == "attention_unet"
    assert info["classes"] == ["background", "cytoplasm", "nucleus"]
    assert info["input"]["size"] == [TINY_INPUT, TINY_INPUT]
    assert info["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert info["sha256"] == sha256_file(tiny_model_dir / "model.onnx")
    assert info["provider"] == "CPUExecutionProvider"
    assert info["providers"][0] == info["provider"]
    assert "evaluation" in info
    assert info["stain_normalization"] is None


def test_model_endpoint_reports_the_stain_normalisation(settings_for: Callable[..., Settings],
                                                        tiny_model_dir: Path, tmp_path: Path) -> None:
    stain = {"method": "reinhard", "space": "CIELAB", "mean": [71.0, 10.5, -6.0], "std": [12.0, 8.0, 6.5]}
    model = copy_model(tiny_model_dir, tmp_path, stain=stain, schema_version=2)
    with running(settings_for(model_path=model)) as client:
        assert client.get("/v1/model").json()["stain_normalization"] == stain


def test_a_model_that_does_not_match_its_sha256_keeps_the_service_unready(
        settings_for: Callable[..., Settings], tiny_model_dir: Path, tmp_path: Path, png_bytes: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    model = copy_model(tiny_model_dir, tmp_path, sha256="0" * 64)
    with caplog.at_level(logging.ERROR, logger="app"), running(settings_for(model_path=model)) as client:
        assert client.get("/health/live").status_code == 200
        assert "could not be loaded" in problem(client.get("/health/ready"), 503)["detail"]
        problem(client.get("/v1/model"), 503)
        problem(client.post("/v1/segment", files=upload(png_bytes)), 503)
    logs = [r for r in caplog.records if r.name.startswith("app") and "sha256" in r.getMessage()]
    assert logs, "the log must say why the model was not loaded"


def test_a_missing_model_keeps_the_service_unready(settings_for: Callable[..., Settings],
                                                   tmp_path: Path) -> None:
    with running(settings_for(model_path=tmp_path / "absent.onnx")) as client:
        problem(client.get("/health/ready"), 503)
        assert client.get("/health/live").status_code == 200


def test_metadata_next_to_the_model_is_found_without_configuration(
        settings_for: Callable[..., Settings], tiny_model_dir: Path, tmp_path: Path) -> None:
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    model = copy_model(tiny_model_dir, tmp_path / "elsewhere", name="moved", input=meta["input"])
    with running(settings_for(model_path=model)) as client:
        assert client.get("/health/ready").json()["model"] == "moved"


def test_readiness_turns_off_when_shutdown_begins(client: TestClient) -> None:
    begin_shutdown(client.app.state.service)  # what SIGTERM does before the server drains
    assert "shutting down" in problem(client.get("/health/ready"), 503)["detail"]
    assert client.get("/health/live").status_code == 200


def test_metrics_carry_request_inference_and_queue_series(client: TestClient, png_bytes: bytes) -> None:
    assert client.post("/v1/segment", files=upload(png_bytes)).status_code == 200
    client.post("/v1/segment", files=upload(b"not an image"))
    text = client.get("/metrics").text
    assert 'http_requests_total{method="POST",route="/v1/segment",status="200"} 1.0' in text
    assert 'http_requests_total{method="POST",route="/v1/segment",status="415"} 1.0' in text
    assert 'http_request_duration_seconds_count{method="POST",route="/v1/segment",status="200"} 1.0' in text
    assert re.search(r"^wbc_inference_seconds_count [1-9]", text, re.MULTILINE), "the request's runs"
    assert re.search(r"^wbc_inference_batch_size_sum [1-9]", text, re.MULTILINE)
    assert "wbc_inference_queue_depth 0.0" in text
    assert 'wbc_images_total{outcome="ok"} 1.0' in text
    assert "wbc_ready 1.0" in text
    assert 'provider="CPUExecutionProvider"' in text


def test_unknown_paths_are_counted_under_one_label(client: TestClient) -> None:
    for path in ("/a", "/b", "/c"):
        client.get(path)
    text = client.get("/metrics").text
    assert 'http_requests_total{method="GET",route="unmatched",status="404"} 3.0' in text


def test_every_response_carries_a_request_id_and_keeps_the_clients(client: TestClient) -> None:
    assert len(client.get("/health/live").headers["X-Request-ID"]) == 32
    echoed = client.get("/health/live", headers={"X-Request-ID": "lab-42.run_7"})
    assert echoed.headers["X-Request-ID"] == "lab-42.run_7"
    unsafe = client.get("/health/live", headers={"X-Request-ID": "bad id\twith tabs"})
    assert unsafe.headers["X-Request-ID"] != "bad id\twith tabs"


def test_request_logs_have_id_size_status_and_latency_but_no_content(
        client: TestClient, png_bytes: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app"):
        response = client.post("/v1/segment", files=upload(png_bytes, "secret-patient-name.png"))
    records = [r for r in caplog.records if getattr(r, "route", None) == "/v1/segment"]
    assert len(records) == 1
    record = records[0]
    assert record.status == 200  # type: ignore[attr-defined]
    assert record.request_bytes > len(png_bytes)  # type: ignore[attr-defined]
    assert record.response_bytes == len(response.content)  # type: ignore[attr-defined]
    assert record.latency_ms > 0  # type: ignore[attr-defined]
    assert "secret-patient-name" not in caplog.text
    from app.api.observability import JsonFormatter

    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["status"] == 200


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/segment/batch", "/v1/model", "/health/ready"} <= schema["paths"].keys()


def test_openapi_documents_every_error_as_a_problem(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    segment = schema["paths"]["/v1/segment"]["post"]["responses"]
    for code in ("413", "415", "422", "503"):
        assert list(segment[code]["content"]) == ["application/problem+json"], code
    assert "Retry-After" in segment["503"]["headers"]
    assert "image/png" in segment["200"]["content"]
    assert "application/zip" in schema["paths"]["/v1/segment/batch"]["post"]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nowhere", 404), ("DELETE", "/v1/segment", 405), ("POST", "/health/live", 405),
], ids=["unknown-path", "delete-segment", "post-live"])
def test_framework_errors_are_problems(client: TestClient, method: str, path: str, status: int) -> None:
    problem(client.request(method, path), status)
