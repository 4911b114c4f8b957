"""Where the server's model calls run: in this process, or in Ray Serve replicas.

A runner answers a guard :class:`~guardrail.service.Call` (``invoke``: the output), streams it
(``stream``: an async generator of the decision as planned, each choice's text deltas, and
the output, whose closing stops the generation; a refusal raises its typed error before the
first piece) and
reports the per-app state of the dataset-level shift (``health``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

import anyio

from adapters.server.settings import ServerSettings
from guardrail import GuardedOutput
from guardrail.decision import GuardDecision
from guardrail.registry import shared_service
from guardrail.service import Call, Delta, GuardService

# What a stream yields: the decision as planned, then text deltas, then the output.
StreamPiece = GuardDecision | Delta | GuardedOutput


class Runner(Protocol):
    async def start(self) -> None: ...

    async def invoke(self, call: Call) -> GuardedOutput: ...

    def stream(self, call: Call) -> AsyncGenerator[StreamPiece, None]: ...

    async def health(self) -> dict[str, str]: ...


def serving(settings: ServerSettings) -> GuardService:
    """The guard service of ``settings``' model with every app registered and calibrated
    (found in the store, or computed from the bundled anchors and stored)."""
    service = shared_service(
        settings.model,
        settings.device,
        settings.dtype,
        settings.family,
        settings.backend,
        settings.engine_args,
    )
    for app in settings.apps:
        service.add_app(app.model_copy(update={"store": app.store or settings.store}))
        service.calibrate(app.name)
    return service


class LocalRunner:
    """Model calls in this process: the guard service schedules them (one batch for all
    apps); waiting for an answer never blocks the event loop."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.service: GuardService | None = None

    def load(self) -> None:
        self.service = serving(self.settings)

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.load)

    def _service(self) -> GuardService:
        assert self.service is not None, "start() first"
        return self.service

    async def invoke(self, call: Call) -> GuardedOutput:
        handle = await anyio.to_thread.run_sync(self._service().submit, call)
        try:
            return await handle.aresult()
        finally:  # cancelled (client gone, deadline): the generation stops
            if not handle.done:
                handle.cancel()

    async def stream(self, call: Call) -> AsyncGenerator[StreamPiece, None]:
        handle = await anyio.to_thread.run_sync(self._service().submit, call)
        try:
            if handle.planned is not None:
                yield handle.planned
            async for delta in handle.adeltas():
                yield delta
            yield handle.result(0)
        finally:  # finished, failed or closed by the consumer: the generation ends
            if not handle.done:
                handle.cancel()

    async def health(self) -> dict[str, str]:
        if self.service is None:
            return {}
        states = self.service.health()  # the shared service may hold other front ends' apps
        return {app.name: states[app.name] for app in self.settings.apps if app.name in states}
