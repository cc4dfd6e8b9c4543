"""Logging sidecar: a small separate process that ships every captured inference record
from the spool (written by ``serving.capture``) into MLflow, in batches, exactly once as
seen by a reader, for the drift detection that comes next.

``read_records`` gives them back as one DataFrame.
"""

from logging_sidecar.reader import read_records

__all__ = ["read_records"]
