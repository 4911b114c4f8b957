"""One guard service per loaded model (checkpoint, device, dtype, family) in a process, shared
by every front end and app."""

from __future__ import annotations

import json
import threading
from typing import Any

from guardrail.backends.runtimes import Runtime
from guardrail.service import GuardService

_SERVICES: dict[tuple[Any, ...], GuardService] = {}
_LOCK = threading.Lock()


def shared_service(
    name_or_path: str,
    device: str | None = None,
    dtype: str | None = None,
    family: str | None = None,
    backend: Runtime = "transformers",
    engine_args: dict[str, Any] | None = None,
) -> GuardService:
    """The process-wide :class:`GuardService` of this checkpoint, loaded on first use (through
    transformers, or on a vLLM engine with ``backend="vllm"`` and vLLM's ``engine_args``):
    apps register with it, so the weights live once and every app's calls share one
    scheduler."""
    engine = json.dumps(engine_args or {}, sort_keys=True, default=str)
    key = (name_or_path, device, dtype, family, backend, engine)
    with _LOCK:
        if key not in _SERVICES:
            _SERVICES[key] = GuardService.from_pretrained(
                name_or_path,
                family=family,
                device=device,
                dtype=dtype,
                backend=backend,
                engine_args=engine_args,
            )
        return _SERVICES[key]
