"""The malloc tuning keeps per-request buffers on the heap: freed buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.allocator import keep_buffers_on_heap

# A child process turns logits into a 300 × 300 mask 50 times, as the service does per request, and
# reports the page faults of those calls.
_CHILD = """
import json, resource, sys
import numpy as np
from app.allocator import keep_buffers_on_heap
from app.interpolate import labels_at_size
taken = keep_buffers_on_heap(int(sys.argv[1]))
logits = np.random.default_rng(0).standard_normal((3, 160, 160)).astype(np.float32)
labels_at_size(logits, (300, 300))  # the first call faults its buffers in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    labels_at_size(logits, (300, 300))
print(json.dumps({"taken": taken, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mmap_mib: int) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(mmap_mib)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_buffers_below_the_threshold_are_reused() -> None:
    tuned, default = _faults(32), _faults(0)
    assert tuned["taken"] and not default["taken"]
    # Each call's class planes (350 KiB each) are mapped afresh with the defaults, reused when tuned.
    assert default["faults"] > 50 * 50
    assert tuned["faults"] < default["faults"] / 20


def test_zero_leaves_the_defaults() -> None:
    assert keep_buffers_on_heap(0, 0) is False
