"""Every operation of the OpenAPI schema, fuzzed by schemathesis against the running service with its
default checks: no server error; status codes, content types, headers and bodies as the schema
documents them (so every 4xx the service returns is in the schema); invalid input refused, valid
input accepted.

The operations are listed from the app's own schema at collection time (no model needed for that);
each test then fetches the schema the running service publishes and fuzzes one operation with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_process import ServiceProcess
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from app.api.main import create_app
from app.api.settings import Settings

#: Examples per operation and generation mode; `-m slow` runs the thorough variant.
EXAMPLES = 25
SLOW_EXAMPLES = 300


def _cases() -> list[Any]:
    """(method, path, generation mode) for every operation: valid input for all, invalid input for those
    that take any (an operation without parameters or body has no invalid request to make)."""
    app = create_app(Settings(model_path="model-not-needed-to-list-operations.onnx", log_format="text"))
    cases = []
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            modes = [GenerationMode.POSITIVE]
            if operation.get("parameters") or operation.get("requestBody"):
                modes.append(GenerationMode.NEGATIVE)
            cases += [pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode.value}")
                      for mode in modes]
    return cases


CASES = _cases()


def _excluded_checks(path: str, mode: GenerationMode) -> list[Any]:
    # A file field's schema (`format: binary`) cannot say "a PNG, JPEG, BMP or TIFF image": random bytes
    # are schema-valid yet rightly refused with the documented 415/422 (still checked against the schema).
    excluded = [positive_data_acceptance]
    if path == "/v1/segment/batch" and mode is GenerationMode.NEGATIVE:
        # In multipart every part is bytes: a file item "mutated" into a boolean is a file holding "true",
        # which the batch answers, as documented, with a per-file 415 inside a 200.
        excluded.append(negative_data_rejection)
    return excluded


@pytest.fixture(scope="session")
def api_schema(service: ServiceProcess) -> schemathesis.BaseSchema:
    """The schema as the running service publishes it, its base URL the service's."""
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


@pytest.fixture(scope="module")
def keyed_schema(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[schemathesis.BaseSchema]:
    """The schema of a service with an API key, fuzzed without the key: 401 must be documented too."""
    process = ServiceProcess(tiny_model_dir / "model.onnx", tmp_path_factory.mktemp("keyed"),
                             api_key="reliability-suite-key").start()
    yield schemathesis.openapi.from_url(f"{process.url}/openapi.json")
    process.stop()


def fuzz(schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode,
         examples: int) -> None:
    """Run `examples` generated requests of one operation through every default check but the excluded."""
    operation = schema[path][method]
    excluded = _excluded_checks(path, mode)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(excluded_checks=excluded, timeout=60)

    check()


def test_every_operation_is_fuzzed() -> None:
    operations = {(p.values[0], p.values[1]) for p in CASES}
    assert {("POST", "/v1/segment"), ("POST", "/v1/segment/batch"), ("GET", "/v1/model"),
            ("GET", "/health/live"), ("GET", "/health/ready"), ("GET", "/metrics")} <= operations


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_keeps_to_its_schema(api_schema: schemathesis.BaseSchema, method: str, path: str,
                                       mode: GenerationMode) -> None:
    fuzz(api_schema, method, path, mode, EXAMPLES)


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/segment"), ("POST", "/v1/segment/batch"),
                                            ("GET", "/v1/model")])
def test_operation_refusing_a_missing_key_keeps_to_its_schema(keyed_schema: schemathesis.BaseSchema,
                                                              method: str, path: str) -> None:
    fuzz(keyed_schema, method, path, GenerationMode.POSITIVE, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_keeps_to_its_schema_thoroughly(api_schema: schemathesis.BaseSchema, method: str,
                                                  path: str, mode: GenerationMode) -> None:
    fuzz(api_schema, method, path, mode, SLOW_EXAMPLES)
