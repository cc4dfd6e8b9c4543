"""Large requests' CPU work, off the event loop, one request at a time.

Serving answers every request from one event loop (one process per replica, see
``serving.server``), and liveness and readiness probes are answered by that same loop. A
request at the row limit (100,000 rows by default) takes a second or more to decode, score
and encode; on the loop, the probes would wait that long, and a kubelet with a 1 s probe
timeout would restart a healthy server.

Invariants:

- A request is *large* when its body (REST) or its values (gRPC, 8 bytes each) are over
  ``OFF_LOOP_BYTES``; only large requests leave the loop. A small one (a single row is under
  1 KiB) is answered on the loop as before: a thread hop would cost it more than its work.
- Large requests run in one worker thread, one after the other: each costs up to ~270 MiB
  while it is decoded (``serving.limits`` says how that was measured), so that is the most
  the server holds for request decoding, however many arrive at once. Python runs one thread
  at a time anyway, so a second thread would not answer them sooner.
- The work keeps the caller's context variables (MLServer's logging context), as
  ``asyncio.to_thread`` does.
- Nothing that is not thread-safe runs there: the capture spool is appended to on the loop.
- A large request's answer is gzip-compressed there too, when the client accepts it
  (``gzipped``): MLServer's ``GZipMiddleware`` would otherwise compress it on the loop, at
  level 9 (0.75 s of CPU for the 2.2 MB JSON answer to 100,000 rows), and it leaves a response
  that already has a ``Content-Encoding`` as it is.
"""

from __future__ import annotations

import asyncio
import contextvars
import gzip
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# 64 KiB: about 1,100 rows of V2 JSON or 800 of binary tensors, 5 to 30 ms of work; a single
# row's body is ~600 bytes.
OFF_LOOP_BYTES = 64 << 10

_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="credit-risk-large-request")


# zlib's default level: 0.18 s of CPU for that 2.2 MB answer, 1.5 % larger than level 9.
GZIP_LEVEL = 6
# Starlette's GZipMiddleware leaves smaller bodies uncompressed (its minimum_size, as MLServer adds it).
GZIP_MINIMUM_BYTES = 500


def is_large(size_bytes: int) -> bool:
    """Whether a request of ``size_bytes`` (body, or values at 8 bytes each) leaves the loop."""
    return size_bytes > OFF_LOOP_BYTES


async def run(function: Callable[[], T]) -> T:
    """``function()`` in the large-request thread, after the large requests before it."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, context.run, function)


def gzipped(
    body: bytes, headers: dict[str, str], accept_encoding: str | None
) -> tuple[bytes, dict[str, str]]:
    """``body`` and its ``headers`` gzip-compressed when ``accept_encoding`` (the request's
    ``Accept-Encoding``) takes gzip, as Starlette's ``GZipMiddleware`` decides; otherwise as
    they are. Called in the large-request thread (zlib releases the GIL while it compresses)."""
    if "gzip" not in (accept_encoding or "") or len(body) < GZIP_MINIMUM_BYTES:
        return body, headers
    compressed = gzip.compress(body, GZIP_LEVEL)
    return compressed, {**headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
