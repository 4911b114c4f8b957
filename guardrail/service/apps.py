"""What an application is to the guard service: its name, guard config, store, trust policy
and limits."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guardrail.anchors import BUNDLED_ANCHORS
from guardrail.config import GuardConfig, fold_guard_fields


class AppSpec(BaseModel):
    """One application of a guard service.

    ``guard`` is its :class:`GuardConfig` (α, mode, layers…); ``store`` a shift store URL (None:
    the embedded folder store) under ``namespace`` (default: the app's name); its dataset-level
    shift is stored under ``anchor_name``. ``trust_policy`` names a policy of
    ``guardrail.trust.POLICIES``. ``max_tokens`` caps a call's answer, ``max_concurrent`` the
    calls it may have queued or running at once. ``GuardConfig`` fields may be given flat.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "default"
    guard: GuardConfig = GuardConfig()
    store: str | None = None
    namespace: str | None = None
    anchor_name: str = BUNDLED_ANCHORS
    trust_policy: str = "image-source"
    max_tokens: int = Field(default=1024, ge=1)
    max_concurrent: int = Field(default=64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _flat_guard_fields(cls, values: Any) -> Any:
        return fold_guard_fields(values)

    @property
    def store_namespace(self) -> str:
        return self.namespace or self.name
