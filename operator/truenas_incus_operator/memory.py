"""Gives memory back to the operating system once a burst of work has settled.

Creating 1000 IncusInstances at once makes 1000 loops act together: JSON bodies, status patches,
aiohttp buffers. CPython frees those objects afterwards, but glibc's malloc keeps the freed pages
in its heap (the top of the heap can only shrink when its very top is free), so the process stays
at its high-water mark: 173 MB after such a burst against 131 MB for an operator restarted over the
same 1000 resources (BENCHMARKS.md, "Memory after bursts"). ``malloc_trim(0)`` hands every free
page back (``madvise(MADV_DONTNEED)`` on free chunks inside the heap, not only its top).

``MemoryRelease.activity()`` is called after each loop pass that wrote something; when no such pass
happened for ``settle`` seconds, it trims once. Steady state writes nothing, so it never trims then.
On a libc without ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _glibc_trim() -> Callable[[], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemoryRelease:
    def __init__(
        self,
        settle: float,
        trim: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``settle`` 0 turns it off; ``trim`` defaults to glibc's ``malloc_trim(0)`` (tests pass a fake)."""
        self.settle = settle
        self.trim = trim if trim is not None else _glibc_trim()
        self.clock = clock
        self.trims = 0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def activity(self) -> None:
        """A pass wrote something: trim ``settle`` seconds after the last such pass."""
        if not self.settle or self.trim is None:
            return
        self._last = self.clock()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.settle, self._check)

    def _check(self) -> None:
        remaining = self._last + self.settle - self.clock()
        if remaining > 0:
            self._timer = asyncio.get_running_loop().call_later(remaining, self._check)
            return
        self._timer = None
        self.release()

    def release(self) -> None:
        if self.trim is None:
            return
        started, before = time.monotonic(), _rss_mb()
        # A full collection first: the cycles a burst leaves (exceptions with their frames, futures)
        # sit in the oldest generation, which CPython collects rarely; freed, their memory can go.
        gc.collect()
        self.trim()
        self.trims += 1
        log.info(
            "Gave memory back to the OS after a burst: RSS %.1f -> %.1f MB (%.2f s)",
            before,
            _rss_mb(),
            time.monotonic() - started,
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
