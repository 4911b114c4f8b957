"""One guard service per loaded model (checkpoint, device, dtype, family) in a process, shared
by every front end and app."""

from __future__ import annotations

import threading

from guardrail.service import GuardService

_SERVICES: dict[tuple[str, str | None, str | None, str | None], GuardService] = {}
_LOCK = threading.Lock()


def shared_service(
    name_or_path: str,
    device: str | None = None,
    dtype: str | None = None,
    family: str | None = None,
) -> GuardService:
    """The process-wide :class:`GuardService` of this checkpoint, loaded on first use: apps
    register with it, so the weights live once and every app's calls share one scheduler."""
    key = (name_or_path, device, dtype, family)
    with _LOCK:
        if key not in _SERVICES:
            _SERVICES[key] = GuardService.from_pretrained(
                name_or_path, family=family, device=device, dtype=dtype
            )
        return _SERVICES[key]
