"""The MLServer version ``serving.mlserver_hooks`` is pinned to (and ``credit-risk serve`` with
another one installed), and what ``ready`` means to MLServer's readers."""

from __future__ import annotations

import os

import pytest
from mlserver.settings import ModelSettings

from serving import mlserver_hooks
from serving.runtime import CreditRiskRuntime
from serving.settings import MODEL_SETTINGS_PATH
from tests.test_serving_settings import serve


def test_the_installed_mlserver_is_the_pinned_one():
    mlserver_hooks.check_mlserver_version()  # what the import did; it would have raised
    mlserver_hooks.check_mlserver_version(mlserver_hooks.MLSERVER_VERSION)


@pytest.mark.parametrize("other", ["1.7.0", "1.8.0", "1.7.1.post1", "2.0.0"])
def test_any_other_mlserver_version_is_refused_in_one_line(other):
    with pytest.raises(ImportError) as refused:
        mlserver_hooks.check_mlserver_version(other)
    assert refused.value.name == "serving.mlserver_hooks"
    message = str(refused.value)
    assert "\n" not in message
    assert f"MLServer {other} is installed" in message and "install mlserver==1.7.1" in message


def test_serve_with_another_mlserver_installed_exits_1_with_one_line(tmp_path):
    """Another installed MLServer, as ``importlib.metadata`` sees it: a distribution record of
    mlserver 9.9.9 ahead of the real one on the path (MLServer's code itself is unchanged)."""
    shadow = tmp_path / "shadow"
    record = shadow / "mlserver-9.9.9.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: mlserver\nVersion: 9.9.9\n")
    path = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    result = serve(tmp_path, PYTHONPATH=path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "error: MLServer 9.9.9 is installed, but serving.mlserver_hooks is written for MLServer 1.7.1 "
        "only (it overrides MLServer's private code): install mlserver==1.7.1"
    ]


def test_ready_is_mlservers_load_and_a_served_version():
    runtime = CreditRiskRuntime(ModelSettings.model_validate_json(MODEL_SETTINGS_PATH.read_text()))
    assert runtime.ready is False  # MLModel.__init__ wrote False
    runtime.ready = True  # what MLServer writes after load() returned True
    assert runtime.ready is False, "no version in the slot yet"
    runtime._served = object()  # what the follower's swap does
    assert runtime.ready is True
    runtime.ready = False  # what MLServer writes after unload() returned True
    assert runtime.ready is False
