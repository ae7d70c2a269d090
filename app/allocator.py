"""glibc malloc tuning: keep an image's worth of buffers on the heap instead of fresh mmap'ed pages.

Every request allocates a few buffers of 100 KiB to a few MiB (decoded pixels, the network input, the
logits, resized class planes, the mask). Above its mmap threshold glibc maps each such buffer fresh
from the kernel and unmaps it when freed, so the next request faults every page in again; on the
service's hot path that costs more than the arithmetic done in those buffers (docs/benchmarks.md).
Raising the thresholds lets freed buffers be reused, at the price of the process keeping up to
`trim_mib` (by default four times `mmap_mib`) of free heap instead of returning it at once.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt() parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_MIB = 1 << 20


def keep_buffers_on_heap(mmap_mib: int, trim_mib: int | None = None) -> bool:
    """Serve allocations below `mmap_mib` from the heap and trim it only above `trim_mib` of free memory
    (default: four times `mmap_mib`).

    Returns:
        Whether the C library took the settings (False off Linux, or with a libc without `mallopt`,
        such as musl, where this is a no-op).
    """
    if not sys.platform.startswith("linux") or mmap_mib <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    trim_mib = max(trim_mib if trim_mib is not None else 4 * mmap_mib, mmap_mib)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = (mallopt(M_MMAP_THRESHOLD, mmap_mib * _MIB) == 1
             and mallopt(M_TRIM_THRESHOLD, trim_mib * _MIB) == 1)
    logger.debug("malloc thresholds: mmap %d MiB, trim %d MiB: %s", mmap_mib, trim_mib,
                 "set" if taken else "not supported")
    return taken
