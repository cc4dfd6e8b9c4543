"""The services' stop request survives a SIGTERM at any moment of the main thread's wait.

A real signal is sent by a child process to itself at the n-th line Python executes inside
``wait()`` (``sys.settrace`` counts them), for every n, and the child must stop. With
``threading.Event`` it hangs at the lines where ``Event.wait`` holds its lock: the first test
shows the probe catches that (CI saw a supervised sidecar hang so on SIGTERM).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from logging_sidecar.stop_flag import StopFlag
from tests.helpers import REPO

CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from logging_sidecar.stop_flag import StopFlag

    kind, at = sys.argv[1], int(sys.argv[2])
    flag = threading.Event() if kind == "event" else StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: flag.set())
    lines = 0

    def count(frame, event, arg):
        global lines
        if event == "line":
            lines += 1
            if lines == at:
                os.kill(os.getpid(), signal.SIGTERM)
        return count

    sys.settrace(lambda frame, event, arg: count)
    flag.wait(0.2)
    sys.settrace(None)
    print(lines, flag.is_set())
    """
)


def signalled_at(kind: str, at: int) -> tuple[int, bool] | None:
    """(lines traced, set) from a child signalled at line ``at`` (0: never); None if it hung."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(at)], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return None  # run() SIGKILLs it: the SIGTERM it sent itself could not end it
    assert done.returncode == 0, done.stderr
    lines, was_set = done.stdout.split()
    return int(lines), was_set == "True"


@pytest.mark.parametrize("kind", ["event", "stop_flag"])
def test_a_sigterm_at_any_line_of_the_wait_stops_it(kind):
    lines, was_set = signalled_at(kind, 0)
    assert not was_set and lines > 5, lines  # the whole wait was traced
    hung = []
    for at in range(1, lines + 1):
        answer = signalled_at(kind, at)
        if answer is None:
            hung.append(at)
            if kind == "event":
                break  # caught: one 10 s hang is enough
        else:
            assert answer[1], f"signalled at line {at}, the flag was not set"
    if kind == "event":
        assert hung, "the probe did not catch threading.Event's lock in a signal handler"
    else:
        assert hung == [], f"hung when signalled at lines {hung} of {lines}"


def test_wait_returns_false_after_the_timeout_and_true_once_set():
    flag = StopFlag()
    assert flag.wait(0.01) is False and not flag.is_set()
    flag.set()
    assert flag.is_set() and flag.wait(5) is True
