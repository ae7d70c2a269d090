"""Micro-batching in front of the model: `infer(x)` from a worker thread, or `await ainfer(x)`.

Callers never see the queue: they hand in `(k, 3, h, w)` inputs and get their logits back. `workers`
threads run the model (on the CPU an int8 model gains most from runs side by side:
`engine.session.auto_workers`); each takes the oldest job and every job that joins within
`max_wait_ms`, up to `max_batch_size` images, and runs them together (on a GPU a batch costs little more
than one image).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.engine.errors import ClientGoneError, NotReadyError, OverloadedError

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    images: np.ndarray  # (k, 3, h, w)
    future: Future[Any] = field(default_factory=Future)
    cancelled: Callable[[], bool] | None = None  # the caller has gone: drop the job when it comes up


class Batcher:
    """A bounded queue and inference threads that merge waiting jobs into batched runs.

    Args:
        run: `(N, 3, h, w)` → `(N, C, h, w)` logits; called from the inference thread only.
        max_batch_size: most images per run.
        max_wait_ms: how long a run waits for more jobs once it holds one and has room; 0: never.
        queue_size: most jobs waiting; more are refused at once (`OverloadedError`, 503). Requests that
            hold a place (`admitted`) are bounded by it too.
        retry_after_s: what an overloaded client is told to wait.
        observe: called after each run with its batch size and duration in seconds.
        on_reject: called whenever a job is refused because the queue is full.
        workers: inference threads, runs at once.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_wait_ms: float,
                 queue_size: int, retry_after_s: int = 1,
                 observe: Callable[[int, float], None] | None = None,
                 on_reject: Callable[[], None] | None = None, workers: int = 1) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0 if max_batch_size > 1 else 0.0
        self.queue_size = queue_size
        self._retry_after = str(retry_after_s)
        self._observe = observe
        self._on_reject = on_reject
        self._jobs: deque[_Job] = deque()
        self._admitted = 0
        self._stopping = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._work, name=f"wbc-inference-{i}", daemon=True)
                         for i in range(workers)]

    @property
    def workers(self) -> int:
        """Runs that may go on at once."""
        return len(self._threads)

    def start(self) -> None:
        """Start the inference threads."""
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the inference threads (`timeout` for all of them)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def depth(self) -> int:
        """Jobs waiting for the inference thread."""
        return len(self._jobs)

    @property
    def capacity(self) -> int:
        """Requests held at once: a full queue and every worker's run."""
        return self.queue_size + self.max_batch_size * self.workers

    def full(self) -> bool:
        """Whether the next request would be refused."""
        return self._admitted >= self.capacity

    def admitted_count(self) -> int:
        """Requests holding a place now."""
        return self._admitted

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a place for one request from before its decoding to its last run, refusing it at once
        when `capacity` requests are already held, so that work waiting for a thread counts as queued
        and an overloaded service spends nothing on a request it cannot serve soon.

        Raises:
            OverloadedError: every place is taken.
        """
        with self._changed:
            if self._admitted >= self.capacity:
                raise self._overloaded()
            self._admitted += 1
        try:
            yield
        finally:
            with self._changed:
                self._admitted -= 1

    def _overloaded(self) -> OverloadedError:
        if self._on_reject is not None:
            self._on_reject()
        return OverloadedError("The inference queue is full; retry shortly.",
                               headers={"Retry-After": self._retry_after})

    def submit(self, images: np.ndarray, cancelled: Callable[[], bool] | None = None) -> Future[Any]:
        """Queue `(k, 3, h, w)` inputs; the future holds `(logits, run_ms)`. A job whose `cancelled()`
        says True when its turn comes is dropped (its future raises `ClientGoneError`).

        Raises:
            OverloadedError: the queue is full (503 with `Retry-After`).
            NotReadyError: the batcher is stopping.
        """
        job = _Job(images, cancelled=cancelled)
        with self._changed:
            if self._stopping:
                raise NotReadyError("The service is shutting down.")
            if len(self._jobs) >= self.queue_size:
                raise self._overloaded()
            self._jobs.append(job)
            self._changed.notify_all()
        return job.future

    def infer(self, images: np.ndarray,
              cancelled: Callable[[], bool] | None = None) -> tuple[np.ndarray, float]:
        """Logits of `(k, 3, h, w)` inputs and the run's milliseconds, waiting for them (worker threads)."""
        result: tuple[np.ndarray, float] = self.submit(images, cancelled).result()
        return result

    async def ainfer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """`infer` for coroutines."""
        result: tuple[np.ndarray, float] = await asyncio.wrap_future(self.submit(images))
        return result

    def _work(self) -> None:
        while jobs := self._next_jobs():
            live = []
            for job in jobs:
                if job.cancelled is not None and job.cancelled():
                    job.future.set_exception(ClientGoneError("The client has gone."))
                elif job.future.set_running_or_notify_cancel():
                    live.append(job)
            self._run_jobs(live)

    def _next_jobs(self) -> list[_Job]:
        """The oldest job and those that join it within the wait; empty once stopping and drained."""
        with self._changed:
            while not self._jobs and not self._stopping:
                self._changed.wait()
            if not self._jobs:
                return []
            jobs = [self._jobs.popleft()]
            count = len(jobs[0].images)
            deadline = time.monotonic() + self._max_wait
            while count < self.max_batch_size:
                if self._jobs and count + len(self._jobs[0].images) <= self.max_batch_size:
                    jobs.append(self._jobs.popleft())
                    count += len(jobs[-1].images)
                    continue
                remaining = deadline - time.monotonic()
                if self._jobs or remaining <= 0 or self._stopping:
                    break
                self._changed.wait(remaining)
            return jobs

    def _run_jobs(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            started = time.perf_counter()
            logits = self._run(images)
            seconds = time.perf_counter() - started
        except Exception as exc:  # the failure belongs to the requests, which report it
            logger.exception("inference failed on a batch of %d jobs", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        if self._observe is not None:
            self._observe(len(images), seconds)
        offset = 0
        for job in jobs:
            job.future.set_result((logits[offset:offset + len(job.images)], seconds * 1000.0))
            offset += len(job.images)
