"""Serving's own settings (``ServingSettings``): defaults, constraints, and ``credit-risk serve``
stopping on a bad value before any port is taken."""

from __future__ import annotations

import os
import subprocess

import pytest
from pydantic import ValidationError

from serving.settings import ServingSettings
from tests.helpers import BIN, NOBODY_URL, free_port


def serve(tmp_path, ports: dict[str, int] | None = None, **env) -> subprocess.CompletedProcess:
    """``credit-risk serve`` on ``ports`` (``{"http": ...}``, free ones for the others) with no
    MLflow to talk to: it must stop by itself."""
    ports = ports or {}
    flags = [f"--{name}-port={ports.get(name) or free_port()}" for name in ("http", "grpc", "metrics")]
    return subprocess.run(
        [str(BIN / "credit-risk"), "serve", *flags],
        env={**os.environ, "MLFLOW_TRACKING_URI": NOBODY_URL, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CREDIT_RISK_LOAD_RETRY_MAX_S", "10"),  # below the minimum's default, 30
        ("CREDIT_RISK_SPOOL_MAX_BYTES", "1GB"),  # the nested spool settings
        ("MLSERVER_GRPC_MAX_MESSAGE_LENGTH", "abc"),  # MLServer's own, named as a variable
        ("OMP_NUM_THREADS", "two"),
    ],
)
def test_serve_with_a_bad_setting_exits_2_naming_it(tmp_path, variable, value):
    result = serve(tmp_path, **{variable: value})
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr and value in result.stderr
    assert "Traceback" not in result.stderr and "Uvicorn running" not in result.stderr


def test_serving_settings_defaults_and_constraints(monkeypatch):
    for name in (
        "CREDIT_RISK_REGISTRY_POLL_S",
        "CREDIT_RISK_LOAD_RETRY_MIN_S",
        "CREDIT_RISK_LOAD_RETRY_MAX_S",
    ):
        monkeypatch.delenv(name, raising=False)
    defaults = ServingSettings()
    assert (defaults.registry_poll_s, defaults.load_retry_min_s, defaults.load_retry_max_s) == (5, 30, 600)

    for variable, bad in (("CREDIT_RISK_REGISTRY_POLL_S", "abc"), ("CREDIT_RISK_REGISTRY_POLL_S", "0"),
                          ("CREDIT_RISK_LOAD_RETRY_MIN_S", "-1")):  # fmt: skip
        with monkeypatch.context() as env:
            env.setenv(variable, bad)
            with pytest.raises(ValidationError) as refused:
                ServingSettings()
            assert [(e["loc"], e["input"]) for e in refused.value.errors()] == [((variable,), bad)]

    monkeypatch.setenv("CREDIT_RISK_LOAD_RETRY_MIN_S", "5")
    monkeypatch.setenv("CREDIT_RISK_LOAD_RETRY_MAX_S", "5")
    assert ServingSettings().load_retry_max_s == 5  # min <= max: equal is fine
    for bad in ("4", "inf", "nan"):
        monkeypatch.setenv("CREDIT_RISK_LOAD_RETRY_MAX_S", bad)
        with pytest.raises(ValidationError) as refused:
            ServingSettings()
        (error,) = refused.value.errors()
        assert error["loc"] == ("CREDIT_RISK_LOAD_RETRY_MAX_S",) and error["input"] == bad


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MLSERVER_TRACING_SERVER", "127.0.0.1:4317"), ("MLSERVER_KAFKA_ENABLED", "true")],
)
def test_serve_with_an_mlserver_setting_the_launcher_refuses_exits_2_naming_it(tmp_path, variable, value):
    """MLServer accepts these, but the launcher would silently not do what they ask."""
    result = serve(tmp_path, **{variable: value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == f"error: {variable} is not supported by this launcher yet"
