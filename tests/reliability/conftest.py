"""Fixtures of the reliability suite: the service as a real `python -m app` process on a loopback port,
serving the tiny model of the shared fixtures in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_process import ServiceProcess


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
