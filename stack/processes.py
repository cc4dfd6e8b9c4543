"""Background processes with a log file and a pid file each, and health polling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServiceError(RuntimeError):
    """A service did not start or did not become healthy; the message says why."""


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    health_url: str
    # Set over this process's environment; a value of None removes that variable (credentials
    # this process holds that the service must not inherit).
    env: dict[str, str | None] | None = None

    def environment(self) -> dict[str, str]:
        merged = {**os.environ, **(self.env or {})}
        return {name: value for name, value in merged.items() if value is not None}

    def log_path(self, state_dir: Path) -> Path:
        return state_dir / "logs" / f"{self.name}.log"

    def pid_path(self, state_dir: Path) -> Path:
        return state_dir / "pids" / f"{self.name}.pid"


def free_port(avoid: frozenset[int] = frozenset()) -> int:
    """A TCP port free on loopback right now (and not in ``avoid``)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(service: Service, state_dir: Path) -> subprocess.Popen:
    """Start detached (own session, output to its log file) and record the pid."""
    log_path, pid_path = service.log_path(state_dir), service.pid_path(state_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            service.command,
            env=service.environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_path.write_text(str(process.pid))
    return process


def wait_healthy(service: Service, process: subprocess.Popen | None, state_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(service.health_url):
            return
        if process is not None and process.poll() is not None:
            raise ServiceError(
                f"{service.name} exited with code {process.returncode} before it was healthy; "
                f"last lines of {service.log_path(state_dir)}:\n{_tail(service.log_path(state_dir))}"
            )
        time.sleep(0.5)
    raise ServiceError(
        f"{service.name} not healthy at {service.health_url} after {timeout:.0f} s; last lines "
        f"of {service.log_path(state_dir)}:\n{_tail(service.log_path(state_dir))}"
    )


def wait_serving(service: Service, version: str, timeout: float) -> None:
    """Wait until a serving process reports ``version`` as the one it serves."""
    deadline = time.monotonic() + timeout
    status = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(service.health_url, timeout=2).json()
            if answer.get("version") == version and answer.get("ready"):
                return
            status = answer.get("status", answer)
        except (httpx.HTTPError, ValueError) as error:
            status = str(error)
        time.sleep(0.5)
    raise ServiceError(f"{service.name} is not serving version {version} after {timeout:.0f} s: {status}")


def running_pid(service: Service, state_dir: Path) -> int | None:
    try:
        pid = int(service.pid_path(state_dir).read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def terminate(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stop(service: Service, state_dir: Path) -> bool:
    pid = running_pid(service, state_dir)
    service.pid_path(state_dir).unlink(missing_ok=True)
    if pid is None:
        return False
    terminate(pid)
    return True
