"""The service as production runs it: `python -m app` in its own process on a free loopback port, with
what the reliability tests read from outside it (peak memory, threads, open files, exit status)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`python -m app` serving `model_path`; `settings` become `WBC_*` variables (`max_batch_size=1` →
    `WBC_MAX_BATCH_SIZE=1`). Its temporary files go to `workdir/tmp`, its output to `workdir/service.log`.

    A `WBC_*` variable of the developer's shell never reaches it: only the settings given here do.
    """

    def __init__(self, model_path: Path, workdir: Path, **settings: Any) -> None:
        self.workdir = workdir
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        values = {"model_path": model_path, "intra_op_threads": 1, "cpu_workers": 2, "log_format": "json",
                  "log_level": "WARNING", **settings}
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("WBC_")},
                    "TMPDIR": str(self.tmpdir), **{f"WBC_{k.upper()}": str(v) for k, v in values.items()}}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> ServiceProcess:
        """Start the process and wait until it is ready (model loaded and warmed up)."""
        self._log = open(self.workdir / "service.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the service was not ready within {timeout_s} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send `sig`, wait for the exit (killing it after `timeout_s`) and return its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
        return int(self.process.returncode)

    def log(self) -> str:
        path = self.workdir / "service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def peak_rss(self) -> int:
        """The most resident memory the process has had (VmHWM), in bytes."""
        return self._status("VmHWM")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def open_files_under(self, folder: Path) -> list[str]:
        """Targets of the process's file descriptors inside `folder` (deleted temporary files included)."""
        found = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith(str(folder)):
                found.append(target)
        return found

    def live(self, timeout_s: float = 10.0) -> bool:
        try:
            return httpx.get(f"{self.url}/health/live", timeout=timeout_s).status_code == 200
        except httpx.TransportError:
            return False


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `predicate()` until it is true or `timeout_s` passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)

