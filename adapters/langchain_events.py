"""Decision records to LangChain callbacks: every call's decision reaches its run's callbacks
as the custom event ``guardrail_decision``, streamed or not."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.utils.utils import LC_ID_PREFIX

from guardrail import GuardedOutput


class DecisionEvents(BaseChatModel):
    """Sends decisions to callbacks (``_report`` from ``_generate``/``_stream``; LangChain
    runs ``_stream`` without a run manager from ``stream``, so those send it themselves)."""

    def _report(self, output: GuardedOutput, run_manager: CallbackManagerForLLMRun | None) -> None:
        """The decision to the run's callbacks as the custom event ``guardrail_decision``."""
        if run_manager is not None:
            CallbackManager(
                run_manager.handlers,
                run_manager.inheritable_handlers,
                parent_run_id=run_manager.parent_run_id,
                tags=run_manager.tags,
                metadata=run_manager.metadata,
            ).on_custom_event(
                "guardrail_decision",
                output.decision.model_dump(mode="json"),
                run_id=run_manager.run_id,
            )

    def _announce(self, chunk: AIMessageChunk, config: RunnableConfig | None) -> None:
        """The decision of a stream's last chunk to the stream's callbacks."""
        safety = chunk.response_metadata.get("safety")
        if not safety:
            return
        config = ensure_config(config)
        run_id = (chunk.id or "").removeprefix(f"{LC_ID_PREFIX}-")
        CallbackManager.configure(
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            config.get("metadata"),
            self.metadata,
        ).on_custom_event(
            "guardrail_decision", safety, run_id=uuid.UUID(run_id) if run_id else uuid.uuid4()
        )

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        streams = self._should_stream(async_api=False, **{**kwargs, "stream": True})
        for chunk in super().stream(input, config, **kwargs):
            if streams:  # otherwise it ran invoke, which reported the decision itself
                self._announce(chunk, config)
            yield chunk

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        streams = self._should_stream(async_api=True, **{**kwargs, "stream": True})
        async for chunk in super().astream(input, config, **kwargs):
            if streams:
                self._announce(chunk, config)
            yield chunk
