"""One loaded model per (checkpoint, device, dtype) in a process, shared by every front end."""

from __future__ import annotations

import threading

from guardrail.engine import GuardedVLM

_MODELS: dict[tuple[str, str | None, str | None, str | None], GuardedVLM] = {}
_LOCK = threading.Lock()


def shared_model(
    name_or_path: str,
    device: str | None = None,
    dtype: str | None = None,
    family: str | None = None,
) -> GuardedVLM:
    """The process-wide :class:`GuardedVLM` for this checkpoint, loaded on first use.

    Apps take views of it with :meth:`GuardedVLM.with_config`, so the weights live once.
    """
    key = (name_or_path, device, dtype, family)
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = GuardedVLM.from_pretrained(
                name_or_path, family=family, device=device, dtype=dtype
            )
        return _MODELS[key]
