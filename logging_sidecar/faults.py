"""Fault points: named moments of a flush or of a prune where a test can SIGKILL the process.

The loop and the pruner call their hook at each point by name and know nothing else about it;
the default hook does nothing. Only the commands (``credit-risk sidecar``, ``credit-risk
records prune``) build a :class:`FaultPoints` hook, from
``CREDIT_RISK_FAULT_POINTS`` and ``CREDIT_RISK_FAULT_PAUSE_S`` (tests only). At a chosen point
it prints ``FAULT-POINT <name> pid=<pid>`` to stderr (the line tests wait for) and sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

# A flush is planned, uploaded, then committed; a prune marks its runs, then deletes each run's
# artifacts, then the run: a kill after each leaves a different state.
FAULT_POINTS = ("after_plan", "after_upload", "after_commit", "after_mark", "after_prune_artifacts")

FaultHook = Callable[[str], None]


def no_faults(_point: str) -> None:
    """The hook of every real run."""


class FaultPoints:
    """Announce the chosen points and pause there, so a test can SIGKILL the process."""

    def __init__(self, points: frozenset[str], pause_s: float):
        if unknown := set(points) - set(FAULT_POINTS):
            raise ValueError(f"unknown fault points {sorted(unknown)}; known: {', '.join(FAULT_POINTS)}")
        self.points, self.pause_s = frozenset(points), pause_s

    def __call__(self, point: str) -> None:
        if point in self.points:
            print(f"FAULT-POINT {point} pid={os.getpid()}", file=sys.stderr, flush=True)
            time.sleep(self.pause_s)
