"""Fixtures of the scale-out tests: a generated image folder, the in-process `wbc-segment` run over it
that the Ray job must equal, and a local Ray cluster of two simulated one-CPU nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.service import encode, sample_rgb

from app.cli import main

#: Object store of each simulated node: the job streams a few blocks of small PNGs at a time.
NODE_OBJECT_STORE_BYTES = 100 * 1024**2


def _field(seed: int) -> Any:
    """A 240×320 smear field with two leukocytes."""
    from model_training.synthetic import lobes, make_field

    cells = [(90, 110, 36, lobes(90, 110, 3, 12, 9)), (230, 140, 32, lobes(230, 140, 2, 10, 9))]
    image, _, _ = make_field(cells, size=(240, 320), seed=seed, red_cells=10)
    return image


@pytest.fixture(scope="package")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight generated images (four fields, four single-cell crops, in two folders) and a truncated PNG."""
    root = tmp_path_factory.mktemp("scale-in")
    (root / "crops").mkdir()
    for seed in range(4):
        (root / f"field_{seed}.png").write_bytes(encode(_field(seed)))
        (root / "crops" / f"cell_{seed}.png").write_bytes(encode(sample_rgb(96, 80, seed=seed)))
    (root / "crops" / "broken.png").write_bytes(encode(sample_rgb())[:300])
    return root


@pytest.fixture(scope="package")
def in_process_run(image_folder: Path, tiny_model_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of `wbc-segment` run in this process over `image_folder`."""
    out = tmp_path_factory.mktemp("scale-local")
    code = main([str(image_folder), str(out), "--model", str(tiny_model_dir / "model.onnx"), "--overlays",
                 "--geojson", "--no-progress"])
    assert code == 1  # the truncated file fails
    return out


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[Any]:
    """A Ray cluster of two simulated nodes with one CPU each; tests connect to `cluster.address`."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=NODE_OBJECT_STORE_BYTES, include_dashboard=False)
    yield cluster
    cluster.shutdown()
