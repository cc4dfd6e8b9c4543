"""A request body limit for any ASGI app, counted after decompression.

``BodyLimit(app, max_bytes)`` wraps an ASGI app (pure ASGI: it imports nothing of MLServer,
FastAPI or Starlette) so that no request body larger than ``max_bytes`` reaches it, however it
is sent.

Invariants:

- A ``Content-Length`` over the limit is refused (413) before any byte of the body is read.
- ``Content-Encoding: gzip`` (or ``x-gzip``) and ``deflate`` (zlib data, RFC 1950) bodies are
  inflated here, incrementally, and inflation stops one byte past the limit: a compressed
  body costs about the limit in memory, whatever it would inflate to (a 2 MB gzip body can
  inflate to 2 GiB). Any other encoding is refused (415), and a body that does not inflate,
  or stops short of the end of its stream, is a 400.
- The app receives the inflated body, as one message, with ``Content-Encoding`` removed and
  ``Content-Length`` set to the inflated size, so nothing behind this inflates it again
  (MLServer's route class would, without a bound, whenever ``Content-Encoding: gzip`` is
  there).
- An uncompressed body with a ``Content-Length`` within the limit streams through untouched
  (the HTTP server already holds the client to that length), and so does a request with no
  body; a chunked one (``Transfer-Encoding: chunked``) is counted as it arrives and refused
  as soon as it passes the limit.
- Refusals have the body MLServer gives its errors (``{"error": "..."}``, one line naming
  the limit) and close the connection, since the client may still be sending.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# zlib's window bits: gzip framing, and zlib framing (what HTTP calls deflate).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_DROPPED_HEADERS = (b"content-encoding", b"content-length")
# Inflated at most this much at a time, so that the piece in flight beside the body stays small.
_PIECE = 64 << 10


class Refused(Exception):
    """The body cannot be passed on; ``status`` and the one-line message say why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyLimit:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refused: Callable[[int], None] | None = None):
        """``on_refused(status)`` is called for each body refused (to count them: the app
        behind never sees these requests)."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            encoding, length, chunked = _body_headers(scope["headers"])
            if length is not None and length > self.max_bytes:
                raise Refused(413, f"the body is {length} bytes, over {self._limit}")
            if encoding is None and not chunked:
                # No body (a GET), or one within the limit that the server holds to its length.
                await self.app(scope, receive, send)
                return
            body = await self._read(receive, _Inflater(encoding) if encoding else _Plain())
        except Refused as refusal:
            if self.on_refused is not None:
                self.on_refused(refusal.status)
            await _refuse(send, refusal.status, str(refusal))
            return
        if body is None:
            return  # the client went away before the end of its body: nobody to answer
        headers = [(name, value) for name, value in scope["headers"] if name not in _DROPPED_HEADERS]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, _replay(body, receive), send)

    @property
    def _limit(self) -> str:
        return f"this server's limit of {self.max_bytes} bytes per request body (counted after decompression)"

    async def _read(self, receive: Receive, decoder: _Plain | _Inflater) -> bytes | None:
        out = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            more = message.get("more_body", False)
            if not decoder.feed(message.get("body", b""), out, self.max_bytes):
                raise Refused(413, f"the body inflates past {self._limit}")
        decoder.finish()
        return bytes(out)


class _Plain:
    """An uncompressed body of unknown length, counted."""

    def feed(self, data: bytes, out: bytearray, limit: int) -> bool:
        out += data
        return len(out) <= limit

    def finish(self) -> None:
        pass


class _Inflater:
    """A gzip or deflate body, inflated chunk by chunk, never more than one byte past the limit."""

    def __init__(self, encoding: str):
        self._encoding = encoding
        self._stream = zlib.decompressobj(_WBITS[encoding])
        self._fed = False

    def feed(self, data: bytes, out: bytearray, limit: int) -> bool:
        self._fed = self._fed or bool(data)
        try:
            while data:
                if self._stream.eof:  # gzip allows several members back to back; zlib data does not
                    if self._encoding == "deflate":
                        raise Refused(400, "the deflate body has bytes after the end of its zlib stream")
                    self._stream = zlib.decompressobj(_WBITS[self._encoding])
                out += self._stream.decompress(data, min(_PIECE, limit + 1 - len(out)))
                if len(out) > limit:
                    return False
                data = self._stream.unused_data if self._stream.eof else self._stream.unconsumed_tail
        except zlib.error as error:
            raise Refused(400, f"the body is not valid {self._encoding} data: {error}") from None
        return True

    def finish(self) -> None:
        if self._fed and not self._stream.eof:
            raise Refused(400, f"the {self._encoding} body ends before the end of its compressed stream")


def _body_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, int | None, bool]:
    """The body's one content coding (``None``: identity), its declared length if any, and
    whether it comes in chunks of no declared length."""
    codings, length, chunked = [], None, False
    for name, value in headers:
        if name == b"content-encoding":
            codings += [token.strip().lower() for token in value.decode("latin-1").split(",")]
        elif name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if not codings:
        return None, length, chunked and length is None
    if len(codings) > 1 or codings[0] not in _WBITS:
        raise Refused(
            415,
            f"Content-Encoding {', '.join(codings)!r} is not accepted; send the body uncompressed, "
            "or with one of gzip or deflate",
        )
    return codings[0], length, chunked and length is None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's ``receive``: the whole body once, then the client's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
