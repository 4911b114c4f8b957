"""What a caller holds for one submitted call: its text as it comes, its output, cancel."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from guardrail.outputs import GuardedOutput

_END = object()


class CallHandle:
    """One call in the guard service. Iterate it (``for`` or ``async for``) for text deltas
    as they become final, then read :meth:`result` (or ``await`` :meth:`aresult`): the output
    with its decision record, or the typed error that ended the call. :meth:`cancel` stops it
    (a client gone, a deadline); a cancelled call ends with :class:`CallCancelledError`.
    """

    def __init__(self, call_id: str, cancel: Any) -> None:
        self.call_id = call_id
        self._cancel = cancel
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_items: asyncio.Queue[object] | None = None
        self._done = threading.Event()
        self._output: GuardedOutput | None = None
        self._error: BaseException | None = None

    # ----------------------------------------------------------------- the service's side

    def push(self, text: str) -> None:
        if text:
            self._put(text)

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

    def __iter__(self) -> Iterator[str]:
        while (item := self._items.get()) is not _END:
            yield str(item)

    async def __aiter__(self) -> AsyncIterator[str]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_items = asyncio.Queue()
            while not self._items.empty():
                self._async_items.put_nowait(self._items.get())
        while (item := await self._async_items.get()) is not _END:
            yield str(item)

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
            async for _ in self:
                pass
        return self.result(0)
