"""Shared test configuration: marker handling for GPU tests."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_runtime_loads()


def _cuda_runtime_loads() -> bool:
    """Both the CUDA runtime the provider links and the driver library (absent without a GPU driver)."""
    import ctypes

    try:
        ctypes.CDLL("libcudart.so.13")
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (onnxruntime CUDA provider and libcudart.so.13)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
