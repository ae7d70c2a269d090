"""The optional API key and CORS."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from support.service import problem, running, upload

from app.api.settings import Settings

KEY = "s3cret-key"


@pytest.fixture
def keyed(settings_for: Callable[..., Settings]) -> TestClient:
    with running(settings_for(api_key=KEY)) as client:
        yield client


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}, {"X-API-Key": ""}],
                         ids=["missing", "wrong", "longer", "empty"])
def test_without_the_right_key_protected_routes_answer_401(keyed: TestClient, png_bytes: bytes,
                                                           headers: dict[str, str]) -> None:
    response = keyed.post("/v1/segment", files=upload(png_bytes), headers=headers)
    problem(response, 401)
    assert response.headers["WWW-Authenticate"] == "ApiKey"
    problem(keyed.get("/v1/model", headers=headers), 401)
    problem(keyed.post("/v1/segment/batch", files=[("files", ("a.png", png_bytes))], headers=headers), 401)


def test_with_the_right_key_protected_routes_answer(keyed: TestClient, png_bytes: bytes) -> None:
    assert keyed.post("/v1/segment", files=upload(png_bytes), headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs"])
def test_health_metrics_and_docs_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_the_key_is_checked_before_the_body_is_read(settings_for: Callable[..., Settings]) -> None:
    with running(settings_for(api_key=KEY, max_request_bytes=10)) as client:
        problem(client.post("/v1/segment", content=b"x" * 1000, headers={"Content-Type": "text/plain"}), 401)


def test_the_key_appears_in_openapi_only_when_configured(keyed: TestClient, client: TestClient) -> None:
    with_key = keyed.get("/openapi.json").json()
    assert "APIKeyHeader" in with_key["components"]["securitySchemes"]
    assert "401" in with_key["paths"]["/v1/segment"]["post"]["responses"]
    without = client.get("/openapi.json").json()
    assert "securitySchemes" not in without.get("components", {})
    assert "401" not in without["paths"]["/v1/segment"]["post"]["responses"]


def test_without_a_key_configured_no_header_is_needed(client: TestClient, png_bytes: bytes) -> None:
    assert client.post("/v1/segment", files=upload(png_bytes)).status_code == 200


def test_an_empty_key_setting_means_no_key(settings_for: Callable[..., Settings]) -> None:
    assert settings_for(api_key="").api_key is None
    assert settings_for(api_key="  ").api_key is None


def test_cors_is_off_unless_origins_are_configured(client: TestClient) -> None:
    response = client.get("/health/live", headers={"Origin": "https://lab.example"})
    assert "access-control-allow-origin" not in response.headers


def test_configured_origins_may_call_the_api_and_read_the_area_headers(
        settings_for: Callable[..., Settings], png_bytes: bytes) -> None:
    settings = settings_for(cors_origins="https://lab.example, https://other.example", api_key=KEY)
    assert settings.cors_origins == ["https://lab.example", "https://other.example"]
    with running(settings) as client:
        preflight = client.options("/v1/segment", headers={
            "Origin": "https://lab.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://lab.example"
        response = client.post("/v1/segment?format=png", files=upload(png_bytes),
                               headers={"Origin": "https://lab.example", "X-API-Key": KEY})
        assert response.headers["access-control-allow-origin"] == "https://lab.example"
        assert "X-Area-Nucleus-Px" in response.headers["access-control-expose-headers"]
        foreign = client.get("/health/live", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers


def test_origins_may_be_given_as_json(settings_for: Callable[..., Settings]) -> None:
    assert settings_for(cors_origins='["https://a.example"]').cors_origins == ["https://a.example"]
