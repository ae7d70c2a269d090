"""deploy/ray/serve_app.py: the service's own FastAPI app on Ray Serve, two replicas on a local cluster
of two simulated nodes, both answering a burst of concurrent requests."""

from __future__ import annotations

import socket
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.service import encode, sample_rgb

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(ray_cluster: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    """The Serve app with two replicas of a quarter CPU each, on the tiny model; a client of its proxy."""
    from ray import serve

    monkeypatch.syspath_prepend(str(ROOT))  # deploy/ is not a package of the install
    from deploy.ray.serve_app import Segmenter

    env = {"PYTHONPATH": str(ROOT), "WBC_MODEL_PATH": str(tiny_model_dir / "model.onnx"),
           "WBC_INTRA_OP_THREADS": "1", "WBC_CPU_WORKERS": "1", "WBC_LOG_FORMAT": "text"}
    port = free_port()
    ray.init(address=ray_cluster.address)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"num_cpus": 0.25, "num_gpus": 0, "runtime_env": {"env_vars": env}}
        deployment = Segmenter.options(num_replicas=2, autoscaling_config=None, ray_actor_options=options)
        serve.run(deployment.bind(), route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.modules.pop("deploy.ray.serve_app", None)


def test_two_replicas_answer_concurrent_requests_and_both_take_some(served: httpx.Client) -> None:
    from deploy.ray.serve_app import REPLICA_HEADER

    assert served.get("/health/ready").status_code == 200
    image = encode(sample_rgb(96, 80, seed=3))

    def segment(_: int) -> httpx.Response:
        return served.post("/v1/segment", files={"file": ("cell.png", image, "image/png")})

    replicas: Counter[str] = Counter()
    for _ in range(3):  # routing is randomised: a burst lands on both replicas almost always
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(segment, range(16)))
        assert [a.status_code for a in answers] == [200] * 16
        assert len({a.json()["areas_px"]["cell"] for a in answers}) == 1  # same image, same answer
        replicas.update(a.headers[REPLICA_HEADER] for a in answers)
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas
