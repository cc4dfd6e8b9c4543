"""What one request may cost: body bytes, rows, and the request id's length.

Invariants:

- ``RequestLimits`` is read from the environment (``CREDIT_RISK_MAX_BODY_BYTES``,
  ``CREDIT_RISK_MAX_ROWS``) like every settings class of this project, and checked there: a
  bad value names its variable.
- The body limit counts bytes after decompression (``serving.body_limit`` applies it); the
  row limit is decided from the declared shape, or the list length on ``/predict``, before
  any value is converted (``serving.v2.check_tensor``); over gRPC, after MLServer's own
  conversion of the message, whose size the message limit bounds. Both answer 413 naming
  the limit.
- A request id (the body's ``id``, the ``X-Request-ID`` header) is at most
  ``MAX_REQUEST_ID_CHARS`` characters of printable ASCII: it is written into every record and
  log line of the request, and may be echoed into response headers, which clients refuse
  beyond 64 KB.
"""

from __future__ import annotations

import re

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import ENV_PREFIX
from serving.errors import InvalidRequest, show

MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_HEADER = "X-Request-ID"

# Printable ASCII only: the id is echoed in the Ce-Id response header, which HTTP carries as
# Latin-1 (a "€" there made the answer a bare 500), and logged and stored everywhere as text.
_NOT_PRINTABLE = re.compile("[^\x20-\x7e]")

# Sized with benchmarks/request_codec.py. 100,000 rows are 5.5 MiB of V2 JSON (58 B/row,
# decoded with a 96 MiB peak) and 7.6 MiB of binary tensors (12 MiB). JSON costs up to 33 times
# its size while parsed (a body of empty lists): an 8 MiB body at most 267 MiB, which leaves a
# 1 GiB pod room for the server (~350 MB) and scoring; 32 MiB would cost 1,067 MiB.
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BODY_BYTES = 8 << 20


class RequestLimits(BaseSettings):
    """The limits of one inference request, on every route (V2 REST and gRPC, ``/predict``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        gt=0,
        validation_alias="CREDIT_RISK_MAX_BODY_BYTES",
        description="largest request body, counted after decompression (and largest gRPC message)",
    )
    max_rows: int = Field(
        DEFAULT_MAX_ROWS,
        gt=0,
        validation_alias="CREDIT_RISK_MAX_ROWS",
        description="most rows one request may score",
    )


def check_request_id(value: object, where: str) -> str | None:
    """``value`` as a request id (``None`` when absent or empty), or an ``InvalidRequest``
    naming ``where`` it came from."""
    if value is None or value == "":
        return None
    if type(value) is not str:
        raise InvalidRequest(f"{where}: expected a string, got {show(value)}")
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(
            f"{where}: {len(value)} characters; a request id has at most {MAX_REQUEST_ID_CHARS}"
        )
    if found := _NOT_PRINTABLE.search(value):
        raise InvalidRequest(
            f"{where}: character U+{ord(found.group()):04X} at position {found.start()} is not printable "
            "ASCII; a request id is printable ASCII text"
        )
    return value
