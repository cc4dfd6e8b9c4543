"""What a healing process reads from its environment; flags of ``credit-risk heal`` override it.

| variable | default | meaning |
| --- | --- | --- |
| ``CREDIT_RISK_HEAL_POLICY`` | none: the defaults, as ``heal.toml`` | the policy file (``--policy``) |
| ``CREDIT_RISK_HEAL_LOCK_DIR`` | the system's temporary folder | where the local lock file lives |
| ``CREDIT_RISK_DATA`` and the other training variables | as for ``credit-risk train`` | the original training file (``--data``) and how the challenger is trained |

The training settings are nested (``TrainingSettings`` reads its own variables), so a heal
trains exactly as ``credit-risk train`` would in the same environment.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import ENV_PREFIX
from training.settings import TrainingSettings

POLICY_VARIABLE = "CREDIT_RISK_HEAL_POLICY"


class HealSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    policy: Path | None = Field(
        None,
        validation_alias=POLICY_VARIABLE,
        description="the policy file (heal.toml layout); unset: the defaults",
    )
    lock_dir: Path = Field(
        Path(tempfile.gettempdir()),
        validation_alias="CREDIT_RISK_HEAL_LOCK_DIR",
        description="folder of the local lock that keeps two attempts on one machine apart",
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @field_validator("policy")
    @classmethod
    def _a_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value

    @field_validator("lock_dir")
    @classmethod
    def _a_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError("no such folder")
        return value

    def lock_path(self, tracking_uri: str) -> Path:
        """One lock per tracking server: attempts against different servers never wait on
        each other (tests run several on one machine)."""
        return (
            self.lock_dir / f"credit-risk-heal-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}.lock"
        )
