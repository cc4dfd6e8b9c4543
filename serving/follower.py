"""Following the registry: which version the configured URI names now, and when to load it.

Every ``poll_interval_s`` the follower asks MLflow which version the configured URI
(``model.identity.PRODUCTION_MODEL_URI``) resolves to. When that differs from the version being
served, it loads the new one in a thread (the event loop keeps answering on the old
one) and hands it to ``swap``. A version that fails to load is retried on a back-off, never in
a loop, while the old one keeps serving; an unreachable MLflow only delays following. A version
the loader refuses (``model.verified.VersionRefused``: its files are not the ones training
recorded, or it answers otherwise than at training) is a failure like any other, retried on
the same back-off (a repaired version then loads), and reported with its reason.

The stage is the contract (the design's URI); the ``production`` alias is kept in step by
everything this project writes, so a divergence means someone moved one of them by hand: it is
logged and shown, and the stage wins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from mlserver.logging import logger

from model.verified import VersionRefused


@dataclass
class _Failure:
    attempts: int
    retry_at: float
    error: str


class RegistryFollower:
    """Polls the registry and drives ``load(name, version)`` / ``swap(loaded)`` for one model URI;
    ``on_load_failure(version)`` is told of every failed attempt, and ``on_refused(version,
    reason)`` of those that were refusals.

    ``status`` says, in one line, what is being served or why nothing is: readiness reports it.
    """

    def __init__(
        self,
        uri: str,
        *,
        alias: str | None,
        poll_interval_s: float,
        retry_min_s: float,
        retry_max_s: float,
        load: Callable[[str, str], object],
        swap: Callable[[object], None],
        on_load_failure: Callable[[str], None] = lambda version: None,
        on_refused: Callable[[str, str], None] = lambda version, reason: None,
    ):
        self.uri = uri
        self._alias = alias
        self._poll_interval_s = poll_interval_s
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._load = load
        self._swap = swap
        self._on_load_failure = on_load_failure
        self._on_refused = on_refused
        self._failures: dict[str, _Failure] = {}
        self._divergence: str | None = None
        self.served: str | None = None
        self.status = f"asking the registry at {MlflowClient().tracking_uri} which version {uri} names"

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self._poll_interval_s)

    async def step(self) -> None:
        """One look at the registry, and a load and swap when it names another version."""
        try:
            name, version = await asyncio.to_thread(self._resolve)
        except Exception as error:  # MLflow down, no such model or stage yet, ...
            self.status = self._not_following(error)
            logger.log(logging.INFO if self.served is None else logging.WARNING, self.status)
            return
        if version == self.served:
            self._failures.pop(version, None)
            self.status = f"serving {name} version {version} ({self.uri}){self._divergence_note()}"
            return
        failure = self._failures.get(version)
        if failure is not None and time.monotonic() < failure.retry_at:
            return
        await self._load_and_swap(name, version)

    def _resolve(self) -> tuple[str, str]:
        client = MlflowClient()
        name, version = get_model_name_and_version(client, self.uri)
        self._check_alias(client, name, str(version))
        return name, str(version)

    def _check_alias(self, client: MlflowClient, name: str, version: str) -> None:
        if self._alias is None:
            return
        try:
            aliased = client.get_model_version_by_alias(name, self._alias).version
        except MlflowException:
            aliased = None
        divergence = (
            None
            if str(aliased) == version
            else f"alias '{self._alias}' points to version {aliased}, not {version}; following {self.uri}"
        )
        if divergence != self._divergence and divergence is not None:
            logger.warning(f"registry divergence: {divergence}")
        self._divergence = divergence

    def _divergence_note(self) -> str:
        return f"; {self._divergence}" if self._divergence else ""

    async def _load_and_swap(self, name: str, version: str) -> None:
        if self.served is None:
            self.status = self._loading(name, version)
        logger.info(f"loading {name} version {version} ({self.uri} now names it)")
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(self._load, name, version)
        except Exception as error:
            self._record_failure(name, version, error)
            return
        previous, self.served = self.served, version
        self._swap(loaded)
        self._failures.pop(version, None)
        self.status = f"serving {name} version {version} ({self.uri}){self._divergence_note()}"
        swapped = f"swapped out version {previous} for" if previous else "now serving"
        logger.info(f"{swapped} {name} version {version}, loaded in {time.perf_counter() - started:.1f} s")

    def _loading(self, name: str, version: str) -> str:
        """While nothing is served; a retry keeps the last failure in view, so that readiness
        never hides why nothing is served behind a bare 'loading'."""
        loading = f"loading {name} version {version} ({self.uri})"
        failure = self._failures.get(version)
        if failure is None:
            return loading
        return (
            f"{loading}, attempt {failure.attempts + 1}; nothing is served: "
            f"attempt {failure.attempts} failed: {failure.error}"
        )

    def _record_failure(self, name: str, version: str, error: Exception) -> None:
        attempts = self._failures[version].attempts + 1 if version in self._failures else 1
        delay = min(self._retry_min_s * 2 ** (attempts - 1), self._retry_max_s)
        refused = isinstance(error, VersionRefused)
        text = str(error) if refused else f"{type(error).__name__}: {error}"
        self._failures[version] = _Failure(attempts, time.monotonic() + delay, text)
        self._on_load_failure(version)
        if refused:
            self._on_refused(version, error.reason)
        kept = f"still serving version {self.served}" if self.served else "nothing is served"
        self.status = (
            f"version {version} of {name} failed to load (attempt {attempts}, next in {delay:.0f} s); "
            f"{kept}: {text}"
        )
        # A refusal says all there is to say; a traceback would only bury it.
        logger.error(self.status, exc_info=None if refused else error)

    def _not_following(self, error: Exception) -> str:
        tracking = MlflowClient().tracking_uri
        if isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST":
            reason = f"nothing to serve yet: {error.message} (registry at {tracking})"
        else:
            reason = (
                f"cannot read {self.uri} from the registry at {tracking}: {type(error).__name__}: {error}"
            )
        if self.served is not None:
            return f"serving version {self.served}, not following the registry right now: {reason}"
        return reason
