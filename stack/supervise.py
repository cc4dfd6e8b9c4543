"""Keep one command running, as ``credit-risk up`` runs the logging sidecar: restart it
when it exits non-zero (after 1 s, doubling to 30 s while it keeps failing), pass SIGTERM
and SIGINT on to it, and exit with its status once it exits 0 or after being asked to stop.

    python -m stack.supervise -- COMMAND [ARGS...]
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

_FIRST_DELAY_S = 1.0
_MAX_DELAY_S = 30.0
_HEALTHY_AFTER_S = 60.0  # a run this long resets the backoff


def supervise(command: list[str]) -> int:
    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    delay = _FIRST_DELAY_S
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command)
        code = child.wait()
        if code == 0 or stopping:
            return code
        if time.monotonic() - started > _HEALTHY_AFTER_S:
            delay = _FIRST_DELAY_S
        print(
            f"supervise: {command[0]} exited with {code}; restarting in {delay:g} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)
        if stopping:
            return code
        delay = min(delay * 2, _MAX_DELAY_S)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m stack.supervise -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
