"""The guard service: one per loaded model, shared by every app and front end.

It owns what every front end needs: per-app configuration (:class:`AppSpec`), trust
classification, limits, one scheduler for all apps (continuous batching), token streaming with
stop strings and tool-call hold-back, cancellation and deadlines, per-request seeds, and
exactly one decision record per call. Front ends translate their framework's calls into
:class:`Call` s and read :class:`CallHandle` s.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from guardrail.backends import Answer, Sampling
from guardrail.backends.runtimes import Runtime, load_vllm
from guardrail.engine import GuardedVLM
from guardrail.errors import (
    CallCancelledError,
    GuardrailError,
    InvalidInputError,
    OverloadedError,
)
from guardrail.requests import GuardRequest
from guardrail.service.apps import AppSpec
from guardrail.service.handle import CallHandle
from guardrail.service.scheduler import Job, Scheduler
from guardrail.service.text_stream import TextStream
from guardrail.trust import POLICIES, ImageSource, TrustInput, TrustPolicy
from shift_store import Lookup, open_store

Trust = Literal["trusted", "untrusted"]


@dataclass(frozen=True)
class Call:
    """One call to the service: the app, the request (messages, images, tools, constraint),
    where each image came from, a caller's trust override, sampling, stop strings, a deadline
    in seconds (the answer ends there as if at ``max_new_tokens``) and the number of choices
    ``n`` (they share the prompt's prefill and the guard's reference rows; with a ``seed``,
    choice ``i`` samples with ``seed + i``)."""

    app: str
    request: GuardRequest
    sampling: Sampling = field(default_factory=Sampling)
    sources: tuple[ImageSource, ...] = ()
    trust: Trust | None = None
    stop: tuple[str, ...] = ()
    deadline_s: float | None = None
    n: int = 1


MAX_CHOICES = 16


@dataclass
class _Choice:
    """One choice of a call in flight: its text stream, then its answer."""

    stream: TextStream
    answer: Answer | None = None
    rows: int = 1


@dataclass
class _App:
    spec: AppSpec
    vlm: GuardedVLM
    policy: TrustPolicy
    store_url: str | None
    active: int = 0


class GuardService:
    """Every app of one loaded model, answered through one scheduler (see the module
    docstring). Thread-safe; front ends share one instance per model."""

    def __init__(self, vlm: GuardedVLM, *, max_running: int = 32) -> None:
        self.model = vlm
        self.scheduler = Scheduler(vlm.backend, max_running)
        self._apps: dict[str, _App] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        backend: Runtime = "transformers",
        engine_args: dict[str, Any] | None = None,
        **options: Any,
    ) -> GuardService:
        """Load a model and serve it: through transformers (``options`` as for
        :meth:`GuardedVLM.from_pretrained`), or on a vLLM engine (``backend="vllm"``,
        ``engine_args`` for ``vllm.LLM``: ``tensor_parallel_size``, ``max_model_len``, ...).
        ``max_running`` is the scheduler's limit."""
        max_running = options.pop("max_running", 32)
        if backend == "vllm":
            return cls(
                GuardedVLM(load_vllm(name_or_path, engine_args, **options)),
                max_running=max_running,
            )
        if engine_args:
            raise InvalidInputError("engine_args are vLLM's: use them with backend='vllm'")
        return cls(GuardedVLM.from_pretrained(name_or_path, **options), max_running=max_running)

    # ----------------------------------------------------------------- apps

    def add_app(
        self, spec: AppSpec, trust_policy: TrustPolicy | None = None, key: str | None = None
    ) -> GuardedVLM:
        """Register ``spec`` under ``key`` (default: its name; calls name the key, records the
        app's name), replacing what was there, and look its dataset-level shift up in its
        store; nothing is computed (see :meth:`calibrate`). Returns the app's view."""
        if trust_policy is None:
            if spec.trust_policy not in POLICIES:
                raise InvalidInputError(
                    f"unknown trust policy {spec.trust_policy!r}; known: {sorted(POLICIES)}"
                )
            trust_policy = POLICIES[spec.trust_policy]()
        vlm = self.model.with_config(spec.guard)
        vlm.use_store(
            open_store(spec.store, namespace=spec.store_namespace),
            anchor_name=spec.anchor_name,
            compute_on_miss=False,
        )
        with self._lock:
            self._apps[key or spec.name] = _App(spec, vlm, trust_policy, spec.store)
        return vlm

    def app(self, name: str) -> GuardedVLM:
        """The engine view of app ``name`` (its config and dataset-level shift)."""
        return self._app(name).vlm

    @property
    def apps(self) -> dict[str, AppSpec]:
        return {name: app.spec for name, app in self._apps.items()}

    def calibrate(
        self,
        name: str,
        anchors: Iterable[str | GuardRequest] | None = None,
        *,
        batch_size: int = 8,
        lock_timeout_s: float = 0.0,
    ) -> Lookup:
        """Make app ``name``'s dataset-level shift available: found in its store, or computed
        from ``anchors`` (default: the bundled set, under the bundled anchor name) and stored.
        Returns the lookup (its ``note`` says what failed)."""
        app = self._app(name)
        return app.vlm.use_store(
            open_store(app.store_url, namespace=app.spec.store_namespace),
            anchor_name=app.spec.anchor_name,
            anchors=anchors,
            batch_size=batch_size,
            lock_timeout_s=lock_timeout_s,
        )

    def health(self) -> dict[str, str]:
        """Per app: whether its dataset-level shift is ready, or why it falls back."""
        states = {}
        for name, app in self._apps.items():
            lookup = app.vlm.dataset_lookup()
            states[name] = (
                "dataset-level shift ready"
                if lookup.vector is not None
                else f"sample-level fallback: {lookup.note or 'no dataset-level shift'}"
            )
        return states

    def _app(self, name: str) -> _App:
        app = self._apps.get(name)
        if app is None:
            raise InvalidInputError(f"no app named {name!r}; known: {sorted(self._apps)}")
        return app

    # ----------------------------------------------------------------- calls

    def refuse(self, app: str, error: GuardrailError) -> GuardrailError:
        """Record a call refused before it reached the service (bad input a front end found)
        with its one decision record, and return the error to raise."""
        known = self._apps.get(app)
        if error.decision is None:
            view = known.vlm if known else self.model
            view.record_refusal(error, known.spec.name if known else app)
        return error

    def submit(self, call: Call) -> CallHandle:
        """Plan ``call`` and queue it; its typed error (with its decision record) is raised
        here when the guard refuses it."""
        started = time.perf_counter()
        try:
            app = self._app(call.app)
            if call.sampling.max_new_tokens > app.spec.max_tokens:
                raise InvalidInputError(f"max_tokens is at most {app.spec.max_tokens}")
            if not 1 <= call.n <= MAX_CHOICES:
                raise InvalidInputError(f"n must be in [1, {MAX_CHOICES}], got {call.n}")
            with self._lock:
                if app.active >= app.spec.max_concurrent:
                    raise OverloadedError(
                        f"app {app.spec.name!r} has {app.spec.max_concurrent} calls running"
                    )
                app.active += 1
        except GuardrailError as e:
            raise self.refuse(call.app, e) from None
        try:
            return self._queue(app, call, started)
        except BaseException:
            with self._lock:
                app.active -= 1
            raise

    def _queue(self, app: _App, call: Call, started: float) -> CallHandle:
        request = self._classified(app, call, started)
        call_id = uuid.uuid4().hex
        prepared = app.vlm.prepare(request, call.sampling, request_id=call_id, started=started)
        markers = [app.vlm.backend.tool_format.marker] if request.tools else []
        choices = [
            _Choice(TextStream(app.vlm.tokenizer, call.stop, markers)) for _ in range(call.n)
        ]
        ids = [call_id] if call.n == 1 else [f"{call_id}-{i}" for i in range(call.n)]

        def cancel(_: str) -> None:
            for request_id in ids:
                self.scheduler.cancel(request_id)

        handle = CallHandle(call_id, cancel, app.vlm.planned(prepared))

        def on_token(index: int, token: int) -> bool:
            stream = choices[index].stream
            handle.push(stream.feed(token), index)
            return not stream.stopped

        def on_end(index: int, answer: Answer, batch_rows: int) -> None:
            choice = choices[index]
            choice.answer, choice.rows = answer, batch_rows
            handle.push(choice.stream.finish(), index)
            if any(c.answer is None for c in choices):
                return  # the call ends with its last choice
            with self._lock:
                app.active -= 1
            answers = [c.answer for c in choices if c.answer is not None]
            texts = [c.stream.text if c.stream.stopped else None for c in choices]
            others = list(zip(answers[1:], texts[1:], strict=True))
            rows = max(c.rows for c in choices)
            output = app.vlm.conclude(prepared, answers[0], rows, texts[0], others)
            error = next((a.error for a in answers if a.error), None)
            if error is None and any(a.finished == "aborted" for a in answers):
                error = CallCancelledError(f"call {call_id} was cancelled")
            if isinstance(error, GuardrailError):
                error.decision = output.decision
            elif error is not None:
                error = GuardrailError(f"generation failed: {type(error).__name__}: {error}")
                error.decision = output.decision
            handle.complete(output, error)

        deadline = None if call.deadline_s is None else time.monotonic() + call.deadline_s
        seed = call.sampling.seed
        jobs = []
        for index, request_id in enumerate(ids):
            backend_request = prepared.backend_request
            if call.n > 1:
                sampling = replace(
                    call.sampling, seed=None if seed is None else (seed + index) % 2**63
                )
                backend_request = replace(
                    backend_request, id=request_id, sampling=sampling, prefill_group=call_id
                )
            on_token_of, on_end_of = (
                functools.partial(on_token, index),
                functools.partial(on_end, index),
            )
            jobs.append(Job(backend_request, on_token_of, on_end_of, deadline))
        self.scheduler.submit(*jobs)
        return handle

    def _classified(self, app: _App, call: Call, started: float) -> GuardRequest:
        """The request with the app's name and, when it has images, its trust verdict."""
        request = replace(call.request, app=app.spec.name)
        if not request.images:
            return request
        if call.trust is not None:
            trusted, reason = call.trust == "trusted", f"caller override: {call.trust}"
        else:
            default = tuple[ImageSource, ...]("app" for _ in request.images)
            verdict = app.policy.classify(
                TrustInput(call.sources or default, lambda: app.vlm.text_state(request)),
                app.vlm.anchor_stats(),
            )
            trusted, reason = verdict.trusted, verdict.reason
        reason += f" (checked in {(time.perf_counter() - started) * 1e3:.1f} ms)"
        return replace(request, trusted=trusted, trust_reason=reason)
