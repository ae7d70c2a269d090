"""The inference queue: overload answers 503 at once, concurrent requests share runs, and the event
loop stays free while the model works."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from support.service import png_array, problem, running, upload

from app.api.settings import Settings


def metric(client: TestClient, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", client.get("/metrics").text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def post_many(client: TestClient, data: bytes, count: int, query: str = "") -> list[Any]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: client.post(f"/v1/segment{query}", files=upload(data, f"{i}.png")),
                             range(count)))


def test_a_full_queue_answers_503_with_retry_after(settings_for: Callable[..., Settings],
                                                   slow_model_path: Path, png_bytes: bytes) -> None:
    settings = settings_for(model_path=slow_model_path, queue_size=1, max_batch_size=1, max_wait_ms=0,
                            retry_after_s=3)
    with running(settings) as client:
        responses = post_many(client, png_bytes, 6)
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses, statuses
        assert set(statuses) == {200, 503}
        for response in responses:
            if response.status_code == 503:
                assert "queue" in problem(response, 503)["detail"]
                assert response.headers["Retry-After"] == "3"
        assert metric(client, "wbc_inference_rejected_total") == statuses.count(503)


def test_a_queue_that_fills_after_admission_still_answers_503(settings_for: Callable[..., Settings],
                                                               png_bytes: bytes) -> None:
    # The queue can fill between a request's admission and its inference (other requests' windows
    # arrive first); the refusal then comes from the engine's worker thread inside the route's task group.
    with running(settings_for(retry_after_s=4)) as client:
        batcher = client.app.state.service.runtime.batcher  # type: ignore[attr-defined]

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise batcher._overloaded()

        batcher.infer = refuse
        single = client.post("/v1/segment", files=upload(png_bytes))
        batch = client.post("/v1/segment/batch", files=[("files", ("a.png", png_bytes)),
                                                        ("files", ("b.png", png_bytes))])
        for response in (single, batch):
            assert "queue" in problem(response, 503)["detail"]
            assert response.headers["Retry-After"] == "4"


def test_concurrent_requests_are_batched_into_one_run_with_the_same_results(
        settings_for: Callable[..., Settings], png_bytes: bytes) -> None:
    with running(settings_for(max_batch_size=4, max_wait_ms=1000)) as client:
        alone = png_array(client.post("/v1/segment?format=png", files=upload(png_bytes)).content)
        runs_alone = metric(client, "wbc_inference_batch_size_count")
        images_alone = metric(client, "wbc_inference_batch_size_sum")
        responses = post_many(client, png_bytes, 4, "?format=png")
        runs = metric(client, "wbc_inference_batch_size_count") - runs_alone
        assert metric(client, "wbc_inference_batch_size_sum") - images_alone == 4 * images_alone
        assert runs < 4 * runs_alone, "some of the four requests shared a run"
        for response in responses:
            assert np.array_equal(png_array(response.content), alone)


def test_without_batching_every_request_runs_alone(settings_for: Callable[..., Settings],
                                                   png_bytes: bytes) -> None:
    with running(settings_for(max_batch_size=1, max_wait_ms=50)) as client:
        post_many(client, png_bytes, 3)
        runs = metric(client, "wbc_inference_batch_size_count")
        assert runs >= 3 and metric(client, "wbc_inference_batch_size_sum") == runs, "one image a run"


def test_liveness_answers_while_inference_is_saturated(settings_for: Callable[..., Settings],
                                                       slow_model_path: Path, png_bytes: bytes) -> None:
    settings = settings_for(model_path=slow_model_path, max_batch_size=1, queue_size=8)
    with running(settings) as client:
        finished: list[float] = []

        def segment(i: int) -> None:
            client.post("/v1/segment", files=upload(png_bytes, f"{i}.png"))
            finished.append(time.monotonic())

        workers = [threading.Thread(target=segment, args=(i,)) for i in range(3)]
        for worker in workers:
            worker.start()
        while metric(client, "wbc_inference_queue_depth") < 1 and not finished:
            time.sleep(0.01)
        live = client.get("/health/live")
        answered = time.monotonic()
        for worker in workers:
            worker.join()
    assert live.status_code == 200
    assert answered < max(finished), "live answered while segmentations were still queued"


def test_a_batch_that_finds_the_queue_full_answers_503(settings_for: Callable[..., Settings],
                                                       png_bytes: bytes) -> None:
    settings = settings_for(queue_size=1, max_batch_size=1, max_wait_ms=0)
    with running(settings) as client:
        # The first model run is held until the batch has been answered (10 s at most). One single is
        # in that run and the other waits in the queue, each sent only once the one before is in
        # place, so the batch must find the queue full however fast or slow the machine is.
        batcher = client.app.state.service.runtime.batcher  # type: ignore[attr-defined]
        started, release = threading.Event(), threading.Event()
        run = batcher._run

        def held(images: np.ndarray) -> np.ndarray:
            if not started.is_set():  # the first run (one inference thread: runs never overlap)
                started.set()
                release.wait(10)
            return run(images)

        batcher._run = held
        singles = [threading.Thread(target=client.post, args=("/v1/segment",),
                                    kwargs={"files": upload(png_bytes, f"{i}.png")}) for i in range(2)]
        try:
            singles[0].start()
            assert started.wait(30), "the first single reached the model"
            singles[1].start()
            deadline = time.monotonic() + 30
            while batcher.depth() < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert batcher.depth() == 1 and batcher.admitted_count() == 2, "the second single is queued"
            files = [("files", (f"{i}.png", png_bytes)) for i in range(4)]
            response = client.post("/v1/segment/batch", files=files)
        finally:
            release.set()
            for thread in singles:
                if thread.ident is not None:  # started
                    thread.join()
        problem(response, 503)
        assert response.headers["Retry-After"] == "1"
        assert client.get("/health/ready").status_code == 200, "overload is not unreadiness"


def test_a_batch_runs_in_groups_of_the_batch_size(settings_for: Callable[..., Settings],
                                                  png_bytes: bytes) -> None:
    with running(settings_for(max_batch_size=2)) as client:
        runs_before = metric(client, "wbc_inference_batch_size_count")
        images_before = metric(client, "wbc_inference_batch_size_sum")
        files = [("files", (f"{i}.png", png_bytes)) for i in range(5)]
        body = client.post("/v1/segment/batch", files=files).json()
        assert [r["filename"] for r in body["results"]] == [f"{i}.png" for i in range(5)]
        assert metric(client, "wbc_inference_batch_size_sum") - images_before >= 5
        runs = metric(client, "wbc_inference_batch_size_count") - runs_before
        assert metric(client, 'wbc_inference_batch_size_bucket{le="2.0"}') - runs_before == runs, \
            "no run holds more than the batch size"
