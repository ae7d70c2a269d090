"""The deployment files: the Dockerfile passes hadolint, the compose file the Compose specification, and
both keep the promises the README makes (GPU reservation, hardening, health checks, a CPU flavour).

`scripts/container-smoke.sh` (`make container-test`) proves that the image builds and serves; these
tests are the fast checks that run with every `make test`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"


def _tool(name: str) -> str:
    """A command of the `dev` extra, from this interpreter's environment first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[dev]'` (or `make install-dev`)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_passes_hadolint() -> None:
    result = _run(_tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_in_the_dockerfile_is_explained(dockerfile: str) -> None:
    lines = dockerfile.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"line {i + 1}: an ignored hadolint rule needs a comment above it saying why")


def test_compose_file_validates_against_the_compose_specification() -> None:
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_rejects_an_unknown_service_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("cap_drop:", "cap_dropped:", 1))
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0
    assert "cap_dropped" in result.stdout + result.stderr


def test_gpu_service_reserves_an_nvidia_gpu_and_starts_without_a_profile(compose: dict[str, Any]) -> None:
    service = compose["services"]["wbc"]
    assert "profiles" not in service, "`docker compose up` must start the GPU service"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "build" in service and "args" not in service["build"], "the GPU service builds the defaults"


def test_cpu_service_is_a_profile_without_gpu_and_with_cpu_onnxruntime(compose: dict[str, Any]) -> None:
    service = compose["services"]["wbc-cpu"]
    assert service["profiles"] == ["cpu"]
    assert "reservations" not in service["deploy"]["resources"]
    args = service["build"]["args"]
    assert args["ONNXRUNTIME"].startswith("onnxruntime==")
    assert "cuda" not in args["BASE_IMAGE"]
    assert service["image"] != compose["services"]["wbc"]["image"]


@pytest.mark.parametrize("name", ["wbc", "wbc-cpu"])
def test_service_is_hardened(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert service["read_only"] is True
    assert any(str(t).split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["deploy"]["resources"]["limits"]["memory"]
    assert "container_name" not in service, "a fixed container name makes --scale impossible"


@pytest.mark.parametrize("name", ["wbc", "wbc-cpu"])
def test_service_healthcheck_asks_for_readiness(compose: dict[str, Any], name: str) -> None:
    check = compose["services"][name]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert "/health/ready" in " ".join(check["test"])
    assert check["start_period"]


@pytest.mark.parametrize(("name", "device"), [("wbc", "${WBC_DEVICE:-cuda}"), ("wbc-cpu", "cpu")])
def test_service_is_configured_through_wbc_variables_and_publishes_its_port(
        compose: dict[str, Any], name: str, device: str) -> None:
    service = compose["services"][name]
    assert service["environment"]["WBC_MODEL_PATH"].startswith("${WBC_MODEL_PATH:-/opt/wbc/weights/")
    assert service["environment"]["WBC_DEVICE"] == device
    assert service["ports"] == ["${WBC_PUBLISH:-8000:8000}"]


def test_proxy_for_replicas_is_opt_in_and_its_config_exists(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["profiles"] == ["scale"]
    config = proxy["volumes"][0].split(":")[0]
    text = (ROOT / config).read_text()
    assert "segmenter:8000" in text
    assert "segmenter" in compose["services"]["wbc"]["networks"]["default"]["aliases"]


def test_dockerfile_defaults_to_cuda13_cudnn9_runtime_with_onnxruntime_gpu(dockerfile: str) -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base.group(1))
    assert re.search(r'^ARG ONNXRUNTIME="onnxruntime-gpu==1\.31\.\*"$', dockerfile, re.MULTILINE)


def test_dockerfile_runs_uvicorn_as_a_non_root_user_with_a_readiness_healthcheck(dockerfile: str) -> None:
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    user = re.search(r"^USER (\S+)$", final_stage, re.MULTILINE)
    assert user is not None and user.group(1).split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n.*/health/ready", final_stage, re.MULTILINE)
    assert 'CMD ["python", "-m", "app"]' in final_stage  # uvicorn with the settings' connection limits
    assert "COPY weights/ " in final_stage


def test_dockerignore_admits_only_what_the_image_needs() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "everything is excluded first"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "app", "weights"}
