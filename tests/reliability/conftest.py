"""Fixtures of the reliability suite: the service as a real `python -m app` process on a loopback port,
serving the tiny model that the service tests export (their fixtures are reused, not copied)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

_APP_TESTS = Path(__file__).resolve().parents[1] / "app"
if str(_APP_TESTS) not in sys.path:
    sys.path.insert(0, str(_APP_TESTS))  # service_support, as the service tests import it

from live_process import ServiceProcess  # noqa: E402


def _service_test_fixtures() -> ModuleType:
    """tests/app/conftest.py under a name of its own (pytest loads it as `conftest` for tests/app only)."""
    spec = importlib.util.spec_from_file_location("wbc_service_test_fixtures", _APP_TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fixtures = _service_test_fixtures()
tiny_model_dir = _fixtures.tiny_model_dir
slow_model_path = _fixtures.slow_model_path
png_bytes = _fixtures.png_bytes
settings_for = _fixtures.settings_for


@pytest.fixture(scope="session")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service process on the tiny model with default limits, shared by the tests that only send
    requests to it."""
    process = ServiceProcess(tiny_model_dir / "model.onnx", tmp_path_factory.mktemp("service")).start()
    yield process
    process.stop()


@pytest.fixture
def fresh_service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A service process of its own, for tests that read its memory, threads or files."""
    process = ServiceProcess(tiny_model_dir / "model.onnx", tmp_path).start()
    yield process
    process.stop()
