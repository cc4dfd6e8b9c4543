"""Serving settings: MLServer's own ``MLSERVER_*`` variables, with this project's defaults.

Defaults are applied to the environment of the MLServer process only where the variable is
not already set, so every one of them can be overridden the MLServer way. There is no
``settings.json``: values in that file would win over the environment.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mlserver.settings import Settings

SERVING_DIR = Path(__file__).resolve().parent
MODEL_SETTINGS = json.loads((SERVING_DIR / "model-settings.json").read_text())
MODEL_NAME: str = MODEL_SETTINGS["name"]
MODEL_URI: str = MODEL_SETTINGS["parameters"]["uri"]


def serving_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment MLServer starts with: ``environ`` plus the defaults it does not set."""
    env = dict(os.environ if environ is None else environ)
    # Loopback unless told otherwise; containers set MLSERVER_HOST=0.0.0.0.
    env.setdefault("MLSERVER_HOST", "127.0.0.1")
    env.setdefault("MLSERVER_DEBUG", "false")
    # One OpenMP thread: with more, p99 went from ~2 ms to ~700 ms when the other core was busy.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Per-port scratch folders, so that servers side by side never share metric files.
    port = env.get("MLSERVER_HTTP_PORT", str(Settings.model_fields["http_port"].default))
    scratch = Path(tempfile.gettempdir()) / f"credit-risk-mlserver-{port}"
    env.setdefault("MLSERVER_METRICS_DIR", str(scratch / "metrics"))
    env.setdefault("MLSERVER_ENVIRONMENTS_DIR", str(scratch / "envs"))
    return env
