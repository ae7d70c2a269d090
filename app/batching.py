"""A bounded inference queue and worker threads that coalesce waiting requests into batched runs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import NotReadyError, OverloadedError

logger = logging.getLogger(__name__)

#: Called after every session run with (batch size, seconds).
RunObserver = Callable[[int, float], None]
#: The model: `(N, 3, h, w)` float32 and whether another run may be going on at the same time →
#: `(N, C, h, w)` logits.
RunFunction = Callable[[np.ndarray, bool], np.ndarray]


@dataclass(frozen=True)
class InferenceResult:
    """Logits `(k, C, h, w)` for one job, the duration of the run(s) that made them, and their size."""

    logits: np.ndarray
    run_ms: float
    batch_size: int


@dataclass
class _Job:
    images: np.ndarray  # (k, 3, h, w)
    future: Future[Any]
    then: Callable[[InferenceResult], Any] | None = None


class Ticket:
    """A job announced to the batcher before it is submitted; see `MicroBatcher.expecting`."""

    def __init__(self) -> None:
        self.open = True


class MicroBatcher:
    """Runs `run(batch)` on `workers` threads, merging jobs that wait into one batch.

    A worker takes the oldest job and every job queued behind it, up to `max_batch_size` images.
    While jobs announced with `expecting()` are still being prepared, it waits for them, at most
    `max_wait_ms`; with none announced it runs at once, so a lone request never waits for company.
    Runs are chunks of at most `max_batch_size` images. At most `queue_size` jobs wait; `submit`
    refuses more at once instead of blocking. With several workers, as many runs go on at once; each
    run is told whether it started alone (no other run going on, no job waiting), so that the model
    can give a lone request every core and share them out when runs overlap.

    Args:
        run: `run(images, concurrent)`, see `RunFunction`; called from the worker threads only.
        max_batch_size: most images per run.
        max_wait_ms: longest wait for announced jobs once the worker holds one.
        queue_size: most jobs waiting.
        retry_after_s: what an overloaded client is told to wait.
        observe: called after each run with its batch size and duration in seconds.
        on_reject: called when the queue refuses a job.
        workers: runs at once.
    """

    def __init__(self, run: RunFunction, max_batch_size: int, max_wait_ms: float,
                 queue_size: int, retry_after_s: int = 1, observe: RunObserver | None = None,
                 on_reject: Callable[[], None] | None = None, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._run = run
        self.max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._queue_size = queue_size
        self._retry_after = str(retry_after_s)
        self._observe = observe
        self._on_reject = on_reject
        self._jobs: deque[_Job] = deque()
        self._expected = 0
        self._running = 0  # runs going on
        self._stopping = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._work, name=f"wbc-inference-{i}", daemon=True)
                         for i in range(workers)]

    @property
    def workers(self) -> int:
        """Runs that may go on at once."""
        return len(self._threads)

    def start(self) -> None:
        """Start the worker threads."""
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the worker threads (`timeout` for all of them)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def depth(self) -> int:
        """Jobs waiting for the worker."""
        return len(self._jobs)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[Ticket]:
        """Announce a job being prepared; pass the ticket to `submit`, which withdraws the announcement
        as it queues the job (or leaving the block does, when the job never comes)."""
        ticket = Ticket()
        with self._changed:
            self._expected += 1
        try:
            yield ticket
        finally:
            with self._changed:
                self._withdraw(ticket)

    def submit(self, images: np.ndarray, ticket: Ticket | None = None,
               then: Callable[[InferenceResult], Any] | None = None) -> Future[Any]:
        """Queue `(k, 3, h, w)` images for inference.

        Args:
            images: the network inputs.
            ticket: the announcement of this job (`expecting`), withdrawn as it is queued.
            then: called on the worker thread with the job's result right after its run; the future
                then holds what it returns (or raises). Saves the hand-over to another thread for
                short follow-up work; with one worker it delays the next run by as much.

        Returns:
            The `InferenceResult`, or `then`'s value.

        Raises:
            OverloadedError: the queue is full (503 with `Retry-After`).
            NotReadyError: the batcher is stopping.
        """
        job = _Job(images, Future(), then)
        with self._changed:
            if ticket is not None:
                self._withdraw(ticket)
            if self._stopping:
                raise NotReadyError("The service is shutting down.")
            if len(self._jobs) >= self._queue_size:
                if self._on_reject is not None:
                    self._on_reject()
                raise OverloadedError("The inference queue is full; retry shortly.",
                                      headers={"Retry-After": self._retry_after})
            self._jobs.append(job)
            self._changed.notify_all()
        return job.future

    def _withdraw(self, ticket: Ticket) -> None:
        """Called with the lock held."""
        if ticket.open:
            ticket.open = False
            self._expected -= 1
            self._changed.notify_all()

    def _work(self) -> None:
        while (taken := self._next_jobs()) is not None:
            jobs, concurrent = taken
            try:
                self._run_jobs([j for j in jobs if j.future.set_running_or_notify_cancel()], concurrent)
            finally:
                with self._changed:
                    self._running -= 1

    def _next_jobs(self) -> tuple[list[_Job], bool] | None:
        """The oldest job and those that join it within the wait, and whether the run will overlap
        another (one going on, or a job left waiting for another worker); None once stopping and
        drained."""
        with self._changed:
            while not self._jobs and not self._stopping:
                self._changed.wait()
            if not self._jobs:
                return None
            jobs = [self._jobs.popleft()]
            count = len(jobs[0].images)
            deadline = time.monotonic() + self._max_wait
            while count < self.max_batch_size:
                if self._jobs:
                    jobs.append(self._jobs.popleft())
                    count += len(jobs[-1].images)
                    continue
                remaining = deadline - time.monotonic()
                if self._expected == 0 or remaining <= 0 or self._stopping:
                    break
                self._changed.wait(remaining)
            concurrent = self._running > 0 or (bool(self._jobs) and self.workers > 1)
            self._running += 1
            return jobs, concurrent

    def _run_jobs(self, jobs: list[_Job], concurrent: bool) -> None:
        if not jobs:
            return
        try:
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            started = time.perf_counter()
            logits = self._run_chunks(images, concurrent)
            run_ms = (time.perf_counter() - started) * 1000.0
        except Exception as exc:  # the failure belongs to the requests, which report it
            logger.exception("inference failed on a batch of %d jobs", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        offset = 0
        for job in jobs:
            count = len(job.images)
            result = InferenceResult(logits[offset:offset + count], run_ms, len(images))
            offset += count
            if job.then is None:
                job.future.set_result(result)
                continue
            try:
                job.future.set_result(job.then(result))
            except Exception as exc:  # the follow-up's failure is its job's alone
                job.future.set_exception(exc)

    def _run_chunks(self, images: np.ndarray, concurrent: bool) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start:start + self.max_batch_size]
            started = time.perf_counter()
            outputs.append(self._run(chunk, concurrent))
            if self._observe is not None:
                self._observe(len(chunk), time.perf_counter() - started)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
