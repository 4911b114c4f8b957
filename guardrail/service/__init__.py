"""The guard service: one per loaded model, shared by every app and front end."""

from guardrail.service.apps import AppSpec
from guardrail.service.handle import CallHandle, Delta
from guardrail.service.service import Call, GuardService

__all__ = ["AppSpec", "Call", "CallHandle", "Delta", "GuardService"]
