"""Logging sidecar: a small separate process that ships every captured inference record
from the spool (written by ``serving.capture``) into MLflow, in batches, exactly once as
seen by a reader, for the drift detection that comes next.

``read_records`` gives them back as one DataFrame.
"""

__all__ = ["read_records"]


def __getattr__(name: str):
    # Imported on first use: the reader imports MLflow (seconds), and every `credit-risk`
    # command imports this package for its settings alone.
    if name == "read_records":
        from logging_sidecar.reader import read_records

        return read_records
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
