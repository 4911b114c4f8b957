"""LangChain's LLM cache, made safe for a guard.

A plain LLM cache keys answers by the model's identifying parameters and replays them without
calling the model. For a guarded model that would let an answer that was never guarded (or was
guarded under another configuration) be served, with a stale decision and no log line.
:class:`GuardedCache` wraps a cache so that

* only answers whose decision shows the guard applied (or a text-only call, which the guard
  passes through untouched) are written;
* a cache hit yields a fresh decision record (new call id, logged like any other) that says
  which call's answer was replayed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.outputs import ChatGeneration, Generation

from guardrail.decision import GuardDecision, log_decision

CACHEABLE_MODES = ("dataset", "sample", "text-only")


def _decision(generation: Generation) -> dict[str, Any] | None:
    if not isinstance(generation, ChatGeneration):
        return None
    safety = generation.message.response_metadata.get("safety")
    return safety if isinstance(safety, dict) else None


class GuardedCache(BaseCache):
    """Wraps ``inner`` (or, when None, whatever ``resolve`` returns at call time: LangChain's
    global cache) under the rules above."""

    def __init__(self, inner: BaseCache | None, resolve: Callable[[], BaseCache | None]) -> None:
        self._inner, self._resolve = inner, resolve

    def _cache(self) -> BaseCache | None:
        return self._inner if self._inner is not None else self._resolve()

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        cache = self._cache()
        found = cache.lookup(prompt, llm_string) if cache is not None else None
        if not found:
            return found
        return [self._replayed(generation) for generation in found]

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        cache = self._cache()
        if cache is not None and all(_cacheable(g) for g in return_val):
            cache.update(prompt, llm_string, return_val)

    def clear(self, **kwargs: Any) -> None:
        cache = self._cache()
        if cache is not None:
            cache.clear(**kwargs)

    @staticmethod
    def _replayed(generation: Generation) -> Generation:
        safety = _decision(generation)
        if safety is None or not isinstance(generation, ChatGeneration):
            return generation
        decision = GuardDecision.model_validate(safety).model_copy(
            update={
                "call_id": uuid.uuid4().hex,
                "fallbacks": [
                    *safety.get("fallbacks", []),
                    f"answer replayed from the LLM cache (call {safety['call_id']})",
                ],
            }
        )
        log_decision(decision)
        metadata = {
            **generation.message.response_metadata,
            "safety": decision.model_dump(mode="json"),
        }
        message = generation.message.model_copy(update={"response_metadata": metadata})
        return ChatGeneration(message=message, generation_info=generation.generation_info)


def _cacheable(generation: Generation) -> bool:
    safety = _decision(generation)
    return safety is not None and safety.get("mode_used") in CACHEABLE_MODES


def cache_key_params(fields: dict[str, Any], guard: dict[str, Any]) -> dict[str, Any]:
    """Identifying parameters for the cache key: every field of the chat model (objects by
    their type and identity) and what the guard resolved them to (``guard``)."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    params = {
        name: value if isinstance(value, plain) else f"{type(value).__name__}@{id(value)}"
        for name, value in fields.items()
    }
    return {**params, "guard": guard}
