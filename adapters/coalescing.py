"""Dynamic batching: requests that arrive together run as one batched engine pass."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from guardrail import GuardedOutput, GuardrailError, GuardRequest

# One result per request: its output, or the error that refused it (the others still run).
RunBatch = Callable[[list[GuardRequest], dict[str, Any]], list[GuardedOutput | GuardrailError]]


@dataclass
class _Group:
    requests: list[GuardRequest] = field(default_factory=list)
    results: list[GuardedOutput | Exception] = field(default_factory=list)
    error: BaseException | None = None
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class RequestCoalescer:
    """Collects requests with equal generation settings for ``window_s`` and runs them as one
    batch, one batch at a time: while a batch runs, the next one keeps collecting (up to
    ``max_batch``), so that load makes batches larger rather than passes concurrent (concurrent
    passes on one device only compete for it). A request the guard refuses gets its own error
    (the batch runs the others); if the whole batch fails unexpectedly, each request is retried
    alone."""

    def __init__(self, run_batch: RunBatch, window_s: float = 0.005, max_batch: int = 16) -> None:
        self._run_batch, self.window_s, self.max_batch = run_batch, window_s, max_batch
        self._lock = threading.Lock()
        self._running = threading.Lock()  # one engine pass at a time
        self._open: dict[Hashable, _Group] = {}

    def submit(self, request: GuardRequest, settings: dict[str, Any]) -> GuardedOutput:
        """Run ``request`` (possibly with others) and return its output."""
        if self.window_s <= 0:
            alone = self._run_batch([request], settings)[0]
            if isinstance(alone, BaseException):
                raise alone
            return alone
        key = json.dumps(settings, sort_keys=True, default=str)
        with self._lock:
            found = self._open.get(key)
            leader = found is None or found.closed or len(found.requests) >= self.max_batch
            group = self._open[key] = _Group() if leader or found is None else found
            slot = len(group.requests)
            group.requests.append(request)
        if leader:
            time.sleep(self.window_s)
            with self._running:  # the group keeps filling until the previous batch is done
                with self._lock:
                    group.closed = True
                    if self._open.get(key) is group:
                        del self._open[key]
                self._run(group, settings)
        else:
            group.done.wait()
        if group.error is not None:
            raise group.error
        outcome = group.results[slot]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _run(self, group: _Group, settings: dict[str, Any]) -> None:
        try:
            group.results = list(self._run_batch(group.requests, settings))
        except BaseException as batch_error:
            if len(group.requests) == 1:
                group.error = batch_error
            else:
                group.results = [self._run_alone(r, settings) for r in group.requests]
        finally:
            group.done.set()

    def _run_alone(
        self, request: GuardRequest, settings: dict[str, Any]
    ) -> GuardedOutput | Exception:
        try:
            return self._run_batch([request], settings)[0]
        except Exception as e:  # delivered to that request's caller
            return e
