"""The package's layers: the engine knows nothing of HTTP, and nothing under `app` needs torch or the
training package (the serving image has neither)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"


def imported_modules(path: Path) -> set[str]:
    """Top-level and dotted names of every module `path` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(APP.rglob("*.py")), ids=lambda p: str(p.relative_to(APP)))
def test_nothing_in_app_imports_torch_or_the_training_package(path: Path) -> None:
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert not roots & {"torch", "model_training"}, path


@pytest.mark.parametrize("path", sorted((APP / "engine").glob("*.py")), ids=lambda p: p.name)
def test_the_engine_knows_nothing_of_http(path: Path) -> None:
    names = imported_modules(path)
    roots = {name.split(".")[0] for name in names}
    assert not roots & {"fastapi", "starlette", "uvicorn", "httpx"}, path
    assert not {n for n in names if n.startswith(("app.api", "app.cli"))}, path


def test_importing_the_service_and_the_folder_command_loads_no_torch() -> None:
    code = ("import sys, app.api.main, app.cli, app.engine; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model_training')); "
            "print(bad); raise SystemExit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
