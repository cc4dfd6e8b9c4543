"""The errors a request can earn, as MLServer errors so that its REST and gRPC handlers answer
them with their status code and the one-line message (``{"error": "..."}`` over REST, the
status's gRPC code otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson
from mlserver.errors import MLServerError


class InvalidRequest(MLServerError):
    """HTTP 400: the request is malformed or a value breaks the contract."""

    def __init__(self, message: str):
        super().__init__(writable(message), status_code=400)


class RequestTooLarge(MLServerError):
    """HTTP 413: the request is over one of this server's limits (the message names it)."""

    def __init__(self, message: str):
        super().__init__(writable(message), status_code=413)


def writable(message: str) -> str:
    """``message`` with any lone surrogate (JSON's ``"\\ud800"`` decodes to one, and a message
    may quote the client's string) written as ``\\ud800``: MLServer's handler must be able to
    encode the answer as UTF-8, or the client gets a bare 500 instead of the error."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


_SHOWN_CHARS = 40  # a value quoted in a message: enough to recognise it, never the whole body


def show(value: object) -> str:
    """A value as a message quotes it: JSON spelling for scalars, cut short; containers by kind
    only, since a client's list may be huge or nested a thousand levels deep."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (math.inf, -math.inf):  # orjson would write null
        return "Infinity" if value > 0 else "-Infinity"
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):  # an infinity, an integer beyond 64 bits, a lone surrogate
        text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def listed(names: Sequence[str], most: int = 5) -> str:
    """Names as a message lists them: the first ``most``, each cut short, and how many more
    (a request may carry a million inputs, or one name of a million characters)."""
    shown = [cut(name) for name in names[:most]]
    return f"{shown}" + (f" and {len(names) - most} more" if len(names) > most else "")


def cut(text: str) -> str:
    """A client's string as a message quotes it: whole when short, its start otherwise."""
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"
