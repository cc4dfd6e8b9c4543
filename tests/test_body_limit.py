"""The body limit (``serving.body_limit``), driven as the HTTP server drives it: ASGI messages
in, ASGI messages out. Gzip and deflate bombs are real (they inflate to what they claim, see
``test_the_bombs_are_real``); what the middleware costs on them is measured with
``tracemalloc`` (bytes allocated), never with time."""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import tracemalloc
import zlib

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from mlserver.rest.app import APIRoute

from serving.body_limit import BodyLimit

LIMIT = 1 << 20
MiB = 1 << 20


def gzip_bomb(inflated: int) -> bytes:
    """One gzip member of ``inflated`` zero bytes. The deflate stream is one block of a MiB of
    zeros repeated: after a full flush a block never refers back, so copies are valid."""
    block, final = _zeros_block()
    crc = 0
    for _ in range(inflated // MiB):
        crc = zlib.crc32(bytes(MiB), crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + block * (inflated // MiB) + final + struct.pack("<II", crc, inflated & 0xFFFFFFFF)


def deflate_bomb(inflated: int) -> bytes:
    """The same stream as zlib data (HTTP's ``deflate``): header, blocks, Adler-32."""
    block, final = _zeros_block()
    adler = 1
    for _ in range(inflated // MiB):
        adler = zlib.adler32(bytes(MiB), adler)
    return b"\x78\xda" + block * (inflated // MiB) + final + struct.pack(">I", adler)


def _zeros_block() -> tuple[bytes, bytes]:
    stream = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream.compress(bytes(MiB))
    stream.flush(zlib.Z_FULL_FLUSH)
    block = stream.compress(bytes(MiB)) + stream.flush(zlib.Z_FULL_FLUSH)
    return block, stream.flush()


def members_bomb(inflated: int) -> bytes:
    """Issue 17's case: a 2 MB gzip body inflating to 2 GiB, as gzip members back to back."""
    return gzip.compress(bytes(MiB), 9) * (inflated // MiB)


def test_the_bombs_are_real():
    assert gzip.decompress(gzip_bomb(8 * MiB)) == bytes(8 * MiB)
    assert zlib.decompress(deflate_bomb(8 * MiB)) == bytes(8 * MiB)
    assert gzip.decompress(members_bomb(8 * MiB)) == bytes(8 * MiB)
    assert len(members_bomb(2048 * MiB)) < 2_200_000  # 2 MB on the wire, 2 GiB inflated


class Exchange:
    """One request through ``BodyLimit(app)``: what the app saw, and what the client got."""

    def __init__(self, body: bytes, headers: dict[str, str], chunk: int = 64 << 10, limit: int = LIMIT):
        self.chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
        self.read = 0  # chunks the middleware took from the client
        self.app_scope = self.app_body = None
        self.sent = []
        self.scope = {"type": "http", "method": "POST", "path": "/x",
                      "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
        self.limit = limit

    def run(self) -> Exchange:
        self.refused = []
        middleware = BodyLimit(self._app, self.limit, on_refused=self.refused.append)
        asyncio.run(middleware(self.scope, self._receive, self._send))
        assert self.refused == [m["status"] for m in self.sent[:1] if m["status"] != 200]
        return self

    async def _receive(self):
        if self.read == len(self.chunks):
            return {"type": "http.disconnect"}
        self.read += 1
        return {
            "type": "http.request",
            "body": self.chunks[self.read - 1],
            "more_body": self.read < len(self.chunks),
        }

    async def _send(self, message):
        self.sent.append(message)

    async def _app(self, scope, receive, send):
        self.app_scope, parts, more = scope, [], True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        self.app_body = b"".join(parts)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def error(self) -> str:
        return json.loads(self.sent[1]["body"])["error"]

    def app_header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.app_scope["headers"] if key == name]


def refused_with_bounded_memory(body: bytes, encoding: str) -> tuple[Exchange, int]:
    # Sent chunked, without Content-Length: a 2 MB Content-Length would be refused unread.
    exchange = Exchange(body, {"Content-Encoding": encoding})
    tracemalloc.start()  # the client's chunks exist already: only what the middleware allocates counts
    try:
        exchange.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exchange.status == 413 and exchange.app_scope is None
    assert exchange.error == (
        f"the body inflates past this server's limit of {LIMIT} bytes per request body (counted after decompression)"
    )
    return exchange, peak


@pytest.mark.parametrize(
    "build, encoding, inflated",
    [
        (members_bomb, "gzip", 2048 * MiB),
        (gzip_bomb, "gzip", 256 * MiB),
        (deflate_bomb, "deflate", 256 * MiB),
    ],
)
def test_a_compression_bomb_costs_about_the_limit_not_what_it_inflates_to(build, encoding, inflated):
    bomb = build(inflated)
    exchange, peak = refused_with_bounded_memory(bomb, encoding)
    # The inflated buffer (the limit and one byte, and bytearray's 1/8 headroom), a 64 KiB
    # piece in flight and zlib's window; the bomb would have been 2 GiB or 256 MiB.
    assert peak < LIMIT * 1.25 + 256 * 1024, f"{peak} bytes allocated"
    assert exchange.read < len(exchange.chunks)  # it stopped reading, too


def test_a_content_length_over_the_limit_is_413_before_reading():
    exchange = Exchange(b"x" * 10, {"Content-Length": str(LIMIT + 1)}).run()
    assert exchange.status == 413 and exchange.read == 0 and exchange.app_scope is None
    assert exchange.error == (
        f"the body is {LIMIT + 1} bytes, over this server's limit of {LIMIT} bytes per request body "
        "(counted after decompression)"
    )
    assert (b"connection", b"close") in exchange.sent[0]["headers"]


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", "deflate", "identity, gzip"])
def test_a_compressed_body_within_the_limit_arrives_inflated_once(encoding):
    body = json.dumps({"inputs": list(range(50_000))}).encode()
    squeezed = zlib.compress(body) if "deflate" in encoding else gzip.compress(body)
    exchange = Exchange(squeezed, {"Content-Encoding": encoding, "Content-Length": str(len(squeezed))}).run()
    assert exchange.status == 200 and exchange.app_body == body
    assert exchange.app_header(b"content-encoding") == []
    assert exchange.app_header(b"content-length") == [str(len(body)).encode()]


def test_a_body_inflating_to_exactly_the_limit_passes():
    body = bytes(LIMIT)
    exchange = Exchange(gzip.compress(body), {"Content-Encoding": "gzip"}).run()
    assert exchange.status == 200 and exchange.app_body == body
    exchange = Exchange(gzip.compress(body + b"!"), {"Content-Encoding": "gzip"}).run()
    assert exchange.status == 413


@pytest.mark.parametrize(
    "encoding, status, message",
    [
        ("br", 415, "Content-Encoding 'br' is not accepted; send the body uncompressed, or with one of gzip or deflate"),
        ("gzip, gzip", 415, "Content-Encoding 'gzip, gzip' is not accepted"),
    ],
)  # fmt: skip
def test_other_encodings_are_415(encoding, status, message):
    exchange = Exchange(b"{}", {"Content-Encoding": encoding}).run()
    assert exchange.status == status and exchange.error.startswith(message) and exchange.app_scope is None


@pytest.mark.parametrize(
    "body, encoding, message",
    [
        (b"{}", "gzip", "the body is not valid gzip data: Error -3 while decompressing data: incorrect header check"),
        # mtime=0: the same bytes in every process, so that parallel workers collect one test id.
        (gzip.compress(b"{}" * 1000, mtime=0)[:-12], "gzip", "the gzip body ends before the end of its compressed stream"),
        (gzip.compress(b"{}", mtime=0) + b"junk", "gzip", "the body is not valid gzip data"),
        (zlib.compress(b"{}") + b"junk", "deflate", "the deflate body has bytes after the end of its zlib stream"),
    ],
)  # fmt: skip
def test_a_body_that_does_not_inflate_is_400(body, encoding, message):
    exchange = Exchange(body, {"Content-Encoding": encoding}).run()
    assert exchange.status == 400 and exchange.error.startswith(message)


def test_gzip_members_back_to_back_inflate_as_one_body():
    body = gzip.compress(b'{"a": ') + gzip.compress(b"1}")
    assert Exchange(body, {"Content-Encoding": "gzip"}, chunk=7).run().app_body == b'{"a": 1}'


def test_a_chunked_body_is_counted_as_it_arrives():
    exchange = Exchange(b"x" * (LIMIT + 1), {"Transfer-Encoding": "chunked"}).run()
    assert exchange.status == 413 and exchange.app_scope is None
    assert exchange.read == len(exchange.chunks)  # the chunk that passed the limit was the last one
    exchange = Exchange(b"x" * LIMIT, {"Transfer-Encoding": "chunked"}).run()
    assert exchange.status == 200 and exchange.app_body == b"x" * LIMIT
    assert exchange.app_header(b"content-length") == [str(LIMIT).encode()]


def test_a_request_without_a_body_passes_untouched():
    exchange = Exchange(b"", {"Accept": "application/json"}).run()
    assert exchange.status == 200 and exchange.app_body == b""
    assert exchange.app_scope["headers"] == [(b"accept", b"application/json")]


def test_a_plain_body_with_its_length_streams_through_untouched():
    body = b"y" * (3 * (64 << 10))
    exchange = Exchange(body, {"Content-Length": str(len(body))}).run()
    assert exchange.status == 200 and exchange.app_body == body
    assert exchange.app_header(b"content-length") == [str(len(body)).encode()]


def test_a_client_gone_mid_body_reaches_nobody():
    class Gone(Exchange):
        async def _receive(self):
            return {"type": "http.disconnect"}

    exchange = Gone(b"{}", {"Content-Encoding": "gzip"}).run()
    assert exchange.sent == [] and exchange.app_scope is None


def test_other_scopes_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(BodyLimit(app, 10)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_behind_it_mlserver_reads_the_inflated_body_and_does_not_inflate_again():
    """MLServer's route class (``mlserver.rest.app.APIRoute``) gunzips any body whose
    ``Content-Encoding`` says gzip, without a bound; behind the middleware it gets the
    inflated body and no such header."""
    seen = {}

    async def echo(request: Request) -> dict:
        body = await request.body()
        seen["type"] = type(request).__module__
        return {"bytes": len(body), "encoding": request.headers.get("content-encoding")}

    app = FastAPI(routes=[APIRoute("/echo", echo, methods=["POST"])])
    app.add_middleware(BodyLimit, max_bytes=LIMIT)
    body = json.dumps(list(range(1000))).encode()
    client = TestClient(app)
    answer = client.post("/echo", content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200 and answer.json() == {"bytes": len(body), "encoding": None}
    assert seen["type"] == "mlserver.rest.requests"
    bomb = client.post("/echo", content=members_bomb(64 * MiB), headers={"Content-Encoding": "gzip"})
    assert bomb.status_code == 413 and "limit of 1048576 bytes" in bomb.json()["error"]
