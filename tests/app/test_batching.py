"""The micro-batcher on its own: when jobs share a run, and when they do not wait for company."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from app.batching import MicroBatcher
from app.errors import NotReadyError, OverloadedError


class Recorder:
    """A stand-in model: logits are the inputs' first channels, run sizes are recorded."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray, concurrent: bool = False) -> np.ndarray:
        self.gate.wait()
        self.sizes.append(len(batch))
        return batch[:, :1] * 2


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def batcher(recorder: Recorder) -> Iterator[MicroBatcher]:
    b = MicroBatcher(recorder, max_batch_size=4, max_wait_ms=60_000, queue_size=3)
    b.start()
    yield b
    recorder.gate.set()
    b.stop(timeout=10)


def image(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 3, 2, 2), value, np.float32)


def test_a_lone_job_runs_without_waiting_for_company(batcher: MicroBatcher, recorder: Recorder) -> None:
    # The wait is a minute: a result well within it shows that nobody waited.
    result = batcher.submit(image(1)).result(timeout=30)
    assert recorder.sizes == [1]
    assert np.array_equal(result.logits, image(2)[:, :1])


def test_announced_jobs_are_waited_for_and_share_a_run(batcher: MicroBatcher, recorder: Recorder) -> None:
    with batcher.expecting() as first_ticket, batcher.expecting() as second_ticket:
        first = batcher.submit(image(1), first_ticket)
        second = batcher.submit(image(3, count=2), second_ticket)
        a, b = first.result(timeout=30), second.result(timeout=30)
    assert recorder.sizes == [3]
    assert a.batch_size == b.batch_size == 3
    assert np.array_equal(a.logits, image(2)[:, :1])
    assert np.array_equal(b.logits, image(6, count=2)[:, :1])


def test_an_announcement_withdrawn_without_a_job_releases_the_wait(batcher: MicroBatcher,
                                                                    recorder: Recorder) -> None:
    with batcher.expecting() as ticket:  # a request that will fail before its job is ready
        pending = batcher.submit(image(1))
        assert ticket.open
    assert pending.result(timeout=30).batch_size == 1
    assert recorder.sizes == [1]


def test_a_large_job_runs_in_chunks_of_the_batch_size(batcher: MicroBatcher, recorder: Recorder) -> None:
    result = batcher.submit(image(1, count=10)).result(timeout=30)
    assert recorder.sizes == [4, 4, 2]
    assert result.logits.shape == (10, 1, 2, 2)


def test_a_full_queue_refuses_at_once_with_retry_after(batcher: MicroBatcher, recorder: Recorder) -> None:
    recorder.gate.clear()  # the worker blocks in its first run
    running = batcher.submit(image(0))
    while batcher.depth():
        pass
    waiting = [batcher.submit(image(i)) for i in range(3)]
    with pytest.raises(OverloadedError) as refused:
        batcher.submit(image(9))
    assert refused.value.headers == {"Retry-After": "1"}
    recorder.gate.set()
    for future in [running, *waiting]:
        future.result(timeout=30)


def test_stopping_finishes_queued_jobs_then_refuses_new_ones(recorder: Recorder) -> None:
    b = MicroBatcher(recorder, max_batch_size=1, max_wait_ms=0, queue_size=8)
    recorder.gate.clear()
    b.start()
    pending = [b.submit(image(i)) for i in range(3)]
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    recorder.gate.set()
    stopper.join(30)
    assert all(f.done() for f in pending)
    with pytest.raises(NotReadyError):
        b.submit(image(1))


def test_a_failing_run_fails_its_jobs_only(recorder: Recorder) -> None:
    calls = []

    def flaky(batch: np.ndarray, concurrent: bool) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return batch[:, :1]

    b = MicroBatcher(flaky, max_batch_size=1, max_wait_ms=0, queue_size=8)
    b.start()
    with pytest.raises(RuntimeError, match="device lost"):
        b.submit(image(1)).result(timeout=30)
    assert b.submit(image(2)).result(timeout=30).batch_size == 1
    b.stop(timeout=10)


def test_two_workers_run_two_jobs_at_once_and_say_so() -> None:
    inside = threading.Barrier(2, timeout=20)  # breaks unless two runs are in progress together
    flags: list[bool] = []

    def run(batch: np.ndarray, concurrent: bool) -> np.ndarray:
        flags.append(concurrent)
        if len(flags) <= 2:
            inside.wait()
        return batch[:, :1]

    b = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, queue_size=8, workers=2)
    first, second = b.submit(image(1)), b.submit(image(2))  # both queued before the workers start
    b.start()
    assert first.result(timeout=30).batch_size == second.result(timeout=30).batch_size == 1
    assert flags == [True, True], "each run knew the other was going on"
    b.submit(image(3)).result(timeout=30)
    assert flags[2] is False, "a run that starts alone is told so"
    assert b.workers == 2
    b.stop(timeout=10)


def test_one_worker_never_overlaps_runs(recorder: Recorder) -> None:
    flags: list[bool] = []

    def run(batch: np.ndarray, concurrent: bool) -> np.ndarray:
        flags.append(concurrent)
        return batch[:, :1]

    b = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, queue_size=8)
    pending = [b.submit(image(i)) for i in range(3)]
    b.start()
    for future in pending:
        future.result(timeout=30)
    assert flags == [False] * 3
    b.stop(timeout=10)


def test_workers_must_be_positive(recorder: Recorder) -> None:
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(recorder, max_batch_size=1, max_wait_ms=0, queue_size=1, workers=0)


def test_a_follow_up_runs_on_the_worker_and_its_value_or_error_is_the_jobs(batcher: MicroBatcher) -> None:
    threads: list[str] = []

    def then(result: object) -> str:
        threads.append(threading.current_thread().name)
        return "finished"

    def broken(result: object) -> str:
        raise ValueError("cannot encode")

    assert batcher.submit(image(1), then=then).result(timeout=30) == "finished"
    assert threads == ["wbc-inference-0"]
    with pytest.raises(ValueError, match="cannot encode"):
        batcher.submit(image(2), then=broken).result(timeout=30)
    assert batcher.submit(image(3)).result(timeout=30).batch_size == 1, "the worker goes on"
