"""The batcher on its own: jobs that wait share a run, a lone job never waits for company it cannot get,
the queue is bounded, and callers only see `infer` / `ainfer`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.api.batching import Batcher
from app.engine.errors import NotReadyError, OverloadedError


class Recorder:
    """A stand-in model: logits are twice the inputs' first channel; run sizes are recorded."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait()
        self.sizes.append(len(batch))
        return batch[:, :1] * 2


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def started(recorder: Recorder, **kwargs: float) -> Batcher:
    options = {"max_batch_size": 4, "max_wait_ms": 0, "queue_size": 3, **kwargs}
    batcher = Batcher(recorder, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


@pytest.fixture
def batcher(recorder: Recorder) -> Iterator[Batcher]:
    b = started(recorder)
    yield b
    recorder.gate.set()
    b.stop(timeout=10)


def image(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 3, 2, 2), value, np.float32)


def test_infer_returns_each_callers_own_logits(batcher: Batcher, recorder: Recorder) -> None:
    logits, run_ms = batcher.infer(image(1))
    assert np.array_equal(logits, image(2)[:, :1]) and run_ms >= 0
    assert recorder.sizes == [1]


def test_jobs_that_queue_behind_a_run_share_the_next_run(batcher: Batcher, recorder: Recorder) -> None:
    recorder.gate.clear()
    first = batcher.submit(image(1))
    while not recorder.sizes and batcher.depth():  # the first job is taken, its run held at the gate
        time.sleep(0.001)
    time.sleep(0.05)
    second, third = batcher.submit(image(3, count=2)), batcher.submit(image(5))
    recorder.gate.set()
    results = [f.result(timeout=30)[0] for f in (first, second, third)]
    assert recorder.sizes == [1, 3]
    assert [r.shape[0] for r in results] == [1, 2, 1]
    assert np.array_equal(results[1], image(6, count=2)[:, :1])
    assert np.array_equal(results[2], image(10)[:, :1])


def test_a_run_waits_for_company_only_up_to_max_wait(recorder: Recorder) -> None:
    batcher = started(recorder, max_wait_ms=300)
    try:
        with ThreadPoolExecutor(2) as pool:
            lone_started = time.perf_counter()
            batcher.infer(image(1))
            lone = time.perf_counter() - lone_started
            both = list(pool.map(lambda v: batcher.infer(image(v)), (1, 2)))
        assert lone >= 0.25, "a lone job waits out max_wait for others to join"
        assert recorder.sizes[-1] == 2, "two callers within the wait share one run"
        assert [float(b[0][0, 0, 0, 0]) for b in both] == [2.0, 4.0]
    finally:
        batcher.stop(timeout=10)


def test_without_room_for_a_second_image_nothing_waits(recorder: Recorder) -> None:
    batcher = started(recorder, max_batch_size=1, max_wait_ms=60_000)
    try:
        begun = time.perf_counter()
        batcher.infer(image(1))
        assert time.perf_counter() - begun < 30, "a run of one image never waits for company"
    finally:
        batcher.stop(timeout=10)


def test_a_full_queue_refuses_at_once_with_retry_after(batcher: Batcher, recorder: Recorder) -> None:
    recorder.gate.clear()
    futures = [batcher.submit(image(1))]
    while batcher.depth():
        time.sleep(0.001)
    futures += [batcher.submit(image(1)) for _ in range(3)]
    with pytest.raises(OverloadedError) as refused:
        batcher.submit(image(1))
    assert refused.value.headers["Retry-After"] == "1"
    recorder.gate.set()
    assert all(f.result(timeout=30) is not None for f in futures)


def test_requests_beyond_the_capacity_are_refused_before_any_work(batcher: Batcher) -> None:
    assert batcher.capacity == 3 + 4
    with contextlib.ExitStack() as held:
        for _ in range(batcher.capacity):
            held.enter_context(batcher.admitted())
        assert batcher.full()
        with pytest.raises(OverloadedError), batcher.admitted():
            pass
    assert not batcher.full()
    with batcher.admitted():  # places are given back when requests end
        pass


def test_stopping_finishes_queued_jobs_then_refuses_new_ones(recorder: Recorder) -> None:
    batcher = started(recorder, max_batch_size=1)
    recorder.gate.clear()
    futures = [batcher.submit(image(v)) for v in (1, 2)]
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.05)
    with pytest.raises(NotReadyError):
        batcher.submit(image(3))
    recorder.gate.set()
    stopper.join(10)
    assert [float(f.result(timeout=1)[0][0, 0, 0, 0]) for f in futures] == [2.0, 4.0]


def test_a_failing_run_fails_its_jobs_only(recorder: Recorder) -> None:
    calls = {"n": 0}

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return recorder(batch)

    batcher = Batcher(flaky, max_batch_size=1, max_wait_ms=0, queue_size=4)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            batcher.infer(image(1))
        assert float(batcher.infer(image(2))[0][0, 0, 0, 0]) == 4.0
    finally:
        batcher.stop(timeout=10)


def test_coroutines_await_inference(batcher: Batcher) -> None:
    async def both() -> list[tuple[np.ndarray, float]]:
        return await asyncio.gather(batcher.ainfer(image(1)), batcher.ainfer(image(4)))

    results = asyncio.run(both())
    assert [float(r[0][0, 0, 0, 0]) for r in results] == [2.0, 8.0]


def test_every_run_is_observed_with_its_size(recorder: Recorder) -> None:
    seen: list[tuple[int, float]] = []
    batcher = Batcher(recorder, max_batch_size=4, max_wait_ms=0, queue_size=4,
                      observe=lambda n, s: seen.append((n, s)))
    batcher.start()
    try:
        batcher.infer(image(1, count=3))
    finally:
        batcher.stop(timeout=10)
    assert [n for n, _ in seen] == [3] and seen[0][1] >= 0


def test_several_workers_run_jobs_side_by_side() -> None:
    both_inside = threading.Event()
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            if running["now"] == 2:
                both_inside.set()
        both_inside.wait(5)
        with lock:
            running["now"] -= 1
        return batch[:, :1]

    batcher = Batcher(run, max_batch_size=1, max_wait_ms=0, queue_size=4, workers=2)
    batcher.start()
    try:
        assert batcher.workers == 2 and batcher.capacity == 4 + 2
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda v: batcher.infer(image(v)), (1, 2)))
    finally:
        batcher.stop(timeout=10)
    assert running["most"] == 2, "two runs went on at once"
