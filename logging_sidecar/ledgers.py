"""The rows the server scored but could not capture, as the sidecar reports them: the total of
every replica's drop ledger in the spool (written by ``serving.capture``, format in
``serving.spool_format``).

Invariant: the reported total is the last one read whole. An unreadable ledger never reads as
zero: the previous total stands and the error is logged once (again only when it changes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving.spool_format import read_drop_ledgers

logger = logging.getLogger("credit_risk.sidecar")


class CaptureDrops:
    def __init__(self, spool: Path):
        self._spool = spool
        self.total = 0
        self._last_error: str | None = None
        self.refresh()

    def refresh(self) -> int:
        try:
            self.total = sum(read_drop_ledgers(self._spool).values())
        except ValueError as error:  # keep the last good total; shipping goes on
            if str(error) != self._last_error:
                self._last_error = str(error)
                logger.error(str(error))
        return self.total
