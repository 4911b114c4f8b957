"""What a caller holds for one submitted call: its text as it comes, its output, cancel."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

from guardrail.decision import GuardDecision
from guardrail.outputs import GuardedOutput

_END = object()


class Delta(NamedTuple):
    """New final text of one choice of a call (0 unless the call asked for ``n > 1``)."""

    choice: int
    text: str


class CallHandle:
    """One call in the guard service. Iterate it (``for`` or ``async for``) for its text as it
    becomes final (the first choice's; :meth:`deltas` and :meth:`adeltas` give every choice's),
    then read :meth:`result` (or ``await`` :meth:`aresult`): the output with its decision
    record, or the typed error that ended the call. :meth:`cancel` stops it (a client gone, a
    deadline); a cancelled call ends with :class:`CallCancelledError`. ``planned`` is the
    decision as planned before generation (what the output's record adds is what generation
    did: batch, live shift norm, runtime events).
    """

    def __init__(self, call_id: str, cancel: Any, planned: GuardDecision | None = None) -> None:
        self.call_id = call_id
        self.planned = planned
        self._cancel = cancel
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_items: asyncio.Queue[object] | None = None
        self._done = threading.Event()
        self._output: GuardedOutput | None = None
        self._error: BaseException | None = None

    # ----------------------------------------------------------------- the service's side

    def push(self, text: str, choice: int = 0) -> None:
        if text:
            self._put(Delta(choice, text))

    def complete(self, output: GuardedOutput | None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._output, self._error = output, error
        self._done.set()
        self._put(_END)

    def _put(self, item: object) -> None:
        with self._lock:
            if self._loop is not None and self._async_items is not None:
                self._loop.call_soon_threadsafe(self._async_items.put_nowait, item)
            else:
                self._items.put(item)

    # ----------------------------------------------------------------- the caller's side

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the call now; nothing more is generated for it."""
        self._cancel(self.call_id)

    def deltas(self) -> Iterator[Delta]:
        """Every choice's text as it becomes final, until the call ends."""
        while (item := self._items.get()) is not _END:
            assert isinstance(item, Delta)
            yield item

    async def adeltas(self) -> AsyncIterator[Delta]:
        """:meth:`deltas` without blocking the event loop."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_items = asyncio.Queue()
            while not self._items.empty():
                self._async_items.put_nowait(self._items.get())
        while (item := await self._async_items.get()) is not _END:
            assert isinstance(item, Delta)
            yield item

    def __iter__(self) -> Iterator[str]:
        return (delta.text for delta in self.deltas() if delta.choice == 0)

    async def __aiter__(self) -> AsyncIterator[str]:
        async for delta in self.adeltas():
            if delta.choice == 0:
                yield delta.text

    def result(self, timeout: float | None = None) -> GuardedOutput:
        """The output (blocks until the call ends); raises the error that ended it."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"call {self.call_id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._output is not None
        return self._output

    async def aresult(self) -> GuardedOutput:
        """:meth:`result` without blocking the event loop."""
        if not self._done.is_set():
            async for _ in self.adeltas():
                pass
        return self.result(0)
