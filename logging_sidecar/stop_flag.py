"""A stop request that a SIGTERM or SIGINT handler may set: the sidecar's, its one-shot
drain's and the monitor service's.

``threading.Event`` cannot be set from a handler. ``Event.set()`` takes the event's lock, and
Python runs a handler in the main thread between two bytecodes, which may be inside that
thread's own ``Event.wait()`` while it holds the same lock. The handler then waits for itself:
the process hangs for good, and ignores every later SIGTERM, since each runs the same handler.
A supervised sidecar did that in CI; the Python docs warn against locks in handlers.

``StopFlag`` holds no lock: ``set()`` writes one attribute, and ``wait()`` sleeps in short
slices, checking it in between. The handler still runs at once; ``time.sleep`` then finishes
its slice (PEP 475), so a waiter sees the request within one slice.
"""

from __future__ import annotations

import time

_SLICE_S = 0.05  # the most a waiter sleeps past set()


class StopFlag:
    """``set()`` / ``is_set()`` / ``wait(timeout)``, like ``threading.Event``, minus the lock."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep until set or for ``timeout`` seconds; True when set."""
        deadline = time.monotonic() + timeout
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, _SLICE_S))
        return self._set
