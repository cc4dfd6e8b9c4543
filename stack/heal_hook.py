"""The healing policy after each monitoring window: ``credit-risk monitor --every --heal``.

The monitor service (``monitoring.service``) calls ``HealAfterWindow`` after each window; it
runs one attempt, ``credit-risk heal --once --json``, as a child process and waits for it.
Why a child, not ``healing.heal.heal_once`` in the service's own process:

- **Identities.** Healing trains, registers and may promote: the trainer's rights. The monitor
  holds READ and the monitoring experiment's EDIT only. The child gets the trainer's
  credentials file (``CREDIT_RISK_HEAL_CREDENTIALS_FILE``) and never the monitor's; without
  that variable it gets no credentials at all, so that on the local stack it picks the
  trainer's file itself (``stack.local.COMMAND_IDENTITIES``) and elsewhere it is refused (401)
  rather than acting as the monitor.
- **Memory and failure.** A retrain holds the training set and a forest; the service's memory
  stays its own, and a crash in training is an exit code, not a dead monitor.

The attempt's policy, cooldown, lease and lock are the command's (``healing``): the service
calling it every window is "the monitor service runs the same policy on its schedule" of
issue 20, and two monitors at once still make at most one challenger. An attempt that ends
refused or failed (exit 1) or with bad arguments (exit 2) raises ``HealAttemptFailed`` with
its last error line, which the service logs and shows on ``/health`` (``after_window_error``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Variables that carry an identity: the monitor's must never reach a healing attempt.
_CREDENTIAL_VARIABLES = (
    "CREDIT_RISK_CREDENTIALS_FILE",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


class HealAttemptFailed(RuntimeError):
    """A healing attempt ended refused, failed, or with bad arguments."""


def attempt_environment(base: dict[str, str], credentials_file: Path | None) -> dict[str, str]:
    """``base`` without the monitor's identity, with ``credentials_file`` as the attempt's."""
    environment = {name: value for name, value in base.items() if name not in _CREDENTIAL_VARIABLES}
    if credentials_file is not None:
        environment["CREDIT_RISK_CREDENTIALS_FILE"] = str(credentials_file)
    return environment


class HealAfterWindow:
    """One healing attempt after each window (``monitoring.service.AfterWindow``)."""

    __name__ = "heal"  # how the service names it in its log and on /health

    def __init__(self, credentials_file: Path | None, command: list[str] | None = None):
        self.credentials_file = credentials_file
        self.command = command or [sys.executable, "-m", "stack.cli", "heal", "--once", "--json"]

    def __call__(self, window) -> None:
        logger.info(f"running the healing policy after the window of version {window.version}")
        done = subprocess.run(
            self.command,
            env=attempt_environment(dict(os.environ), self.credentials_file),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        for line in done.stderr.splitlines():  # the trainer's progress, and the command's lines
            logger.info(f"heal: {line}")
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            last = errors[-1] if errors else f"exit code {done.returncode}"
            raise HealAttemptFailed(f"credit-risk heal --once: {last}")
        result = json.loads(done.stdout)
        logger.info(
            f"healing attempt {result['attempt_run_id']}: {result['state']}, triggered "
            f"{result['triggered']}, challenger {result['candidate_version']}, promoted {result['promoted']}"
        )
