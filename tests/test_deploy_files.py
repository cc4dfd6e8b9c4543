"""Static checks of the deployment files: hadolint and `docker compose config`."""

import os
import shutil
import subprocess

import pytest

from tests.helpers import BIN, REPO


def test_dockerfiles_pass_hadolint():
    result = subprocess.run(
        [str(BIN / "hadolint"), "Dockerfile.train", "Dockerfile.serve"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_is_valid():
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    ):
        if os.environ.get("CREDIT_RISK_REQUIRE_DOCKER") == "1":
            pytest.fail("CREDIT_RISK_REQUIRE_DOCKER=1 but `docker compose` is not available")
        pytest.skip("`docker compose` is not available")
    result = subprocess.run(
        ["docker", "compose", "config", "--quiet"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
