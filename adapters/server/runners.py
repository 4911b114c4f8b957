"""Where the server's model calls run: in this process, or in Ray Serve replicas.

A runner answers for an app (``invoke``), streams (``stream``: an async generator whose closing
stops the generation; a refusal raises its typed error before the first piece) and reports the
per-app state of the dataset-level shift (``health``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage

from adapters.langchain import ChatGuardedVLM
from adapters.server.settings import AppSettings, ServerSettings


@dataclass(frozen=True)
class Call:
    """One model call: the app, its conversation, stop sequences and call arguments."""

    app: str
    messages: list[BaseMessage]
    stop: list[str] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def settings_key(self) -> str:
        """Calls with equal keys can share one batched pass."""
        return repr((self.app, self.stop, sorted(self.arguments.items())))


class Runner(Protocol):
    async def start(self) -> None: ...

    async def invoke(self, call: Call) -> AIMessage: ...

    def stream(self, call: Call) -> AsyncGenerator[AIMessageChunk, None]: ...

    async def health(self) -> dict[str, str]: ...


def chat_model(settings: ServerSettings, app: AppSettings) -> ChatGuardedVLM:
    """The chat model that serves ``app`` (models are shared between apps by the registry)."""
    return ChatGuardedVLM(
        model=settings.model,
        family=settings.family,
        device=settings.device,
        dtype=settings.dtype,
        store=settings.store,
        app=app.name,
        namespace=app.store_namespace,
        alpha=app.alpha,
        mode=app.mode,
        trust_policy=app.trust_policy,
        on_unavailable=app.on_unavailable,
        max_tokens=app.max_tokens,
        cache=False,
    )


class LocalRunner:
    """Model calls in this process, on worker threads (the chat model's coalescer batches
    concurrent calls)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.chats: dict[str, ChatGuardedVLM] = {}

    def load(self) -> None:
        for app in self.settings.apps:
            self.chats[app.name] = chat_model(self.settings, app)

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.load)

    async def invoke(self, call: Call) -> AIMessage:
        """The answer; ``response_metadata["queue_seconds"]`` is how long the call waited for a
        worker thread."""
        chat = self.chats[call.app]
        submitted = time.perf_counter()

        def run() -> AIMessage:
            waited = time.perf_counter() - submitted
            message = chat.invoke(call.messages, stop=call.stop, **call.arguments)
            assert isinstance(message, AIMessage)
            message.response_metadata["queue_seconds"] = waited
            return message

        return await anyio.to_thread.run_sync(run)

    async def stream(self, call: Call) -> AsyncGenerator[AIMessageChunk, None]:
        chat = self.chats[call.app]
        pieces = chat.stream(call.messages, stop=call.stop, **call.arguments)
        try:
            while (piece := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                yield piece
        finally:  # finished, failed or closed by the consumer: the generation ends
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_close, pieces)

    async def health(self) -> dict[str, str]:
        def states() -> dict[str, str]:
            found = {}
            for name, chat in self.chats.items():
                lookup = chat.guarded_model.dataset_lookup()
                found[name] = (
                    "dataset-level shift ready"
                    if lookup.vector is not None
                    else f"sample-level fallback: {lookup.note or 'no dataset-level shift'}"
                )
            return found

        return await anyio.to_thread.run_sync(states)


def _close(pieces: Iterator[AIMessageChunk]) -> None:
    close = getattr(pieces, "close", None)
    if close is not None:
        close()
