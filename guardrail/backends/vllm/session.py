"""A :class:`~guardrail.backends.base.BatchSession` on a shared vLLM engine.

vLLM owns the schedule: every request is admitted at once, and each session only feeds and
reads its own requests (the engine's outputs and the workers' reports are routed to the session
that owns them, so calibration can run beside the service). A sample-level request is three
vLLM requests: the references first, so that a first-come scheduler never runs the request
ahead of them; a constrained request first, its grammar compiled before its references are
added (only it has a grammar: the references are given its masked logits). Their tokens must
agree at every step. When the workers report the lockstep
broken (chunked prefill, preemption) or the tokens disagree, the three are recomputed from
scratch with the same seed once another request of the session has finished (the KV cache that
preempted them has room again), the tokens already passed on are checked against the
recomputation and not sent again, and the request's decision notes it; after five tries, it
fails closed.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from guardrail.backends.base import BackendRequest, Finish, StepEvent, TokenLogprob
from guardrail.backends.vllm.worker import GuardSpec, Role
from guardrail.constraints import OutputConstraint
from guardrail.errors import GuardUnavailableError
from guardrail.requests import Rendering
from shift_store import ShiftVector


class Host(Protocol):
    """What a session needs of its backend (:class:`~guardrail.backends.vllm.VLLMBackend`)."""

    engine: Any  # vLLM's LLMEngine
    lock: threading.Lock  # one thread steps the engine at a time
    mailboxes: dict[str, Any]  # request id -> the session that owns it

    def prompt(self, rendering: Rendering) -> dict[str, Any]: ...
    def grammar(self, constraint: OutputConstraint) -> str: ...
    def register_shift(self, shift: ShiftVector) -> str: ...
    def reports(self) -> dict[str, dict[str, Any]]: ...
    def await_grammar(self, request_id: str, timeout_s: float = 60.0) -> None: ...
    def stop_token_ids(self) -> set[int]: ...

    @property
    def stops(self) -> frozenset[int]: ...


MAX_TRIES = 5
_ROLES: tuple[Role, ...] = ("corrupted", "text", "main")


@dataclass
class _Live:
    """One guard request in flight: its vLLM requests and what has been passed on."""

    request: BackendRequest
    seed: int | None
    tries: int = 0
    ids: dict[Role, str] = field(default_factory=dict)
    tokens: dict[Role, list[int]] = field(default_factory=dict)
    finish: dict[Role, str] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the request row's tokens
    notes: list[str] = field(default_factory=list)
    first: bool = True
    live_norm: float | None = None
    prompt_len: int = 0
    parked_at: int = 0  # finished requests of the session when it was parked

    @property
    def sample(self) -> bool:
        c = self.request.correction
        return c is not None and c.references is not None


class VLLMBatch:
    """The guard's requests on a shared vLLM engine (see the module docstring)."""

    def __init__(self, backend: Host) -> None:
        self._backend = backend
        self._id = uuid.uuid4().hex[:12]
        self._live: dict[str, _Live] = {}
        self.inbox: list[Any] = []  # engine outputs routed here
        self.report_box: dict[str, dict[str, Any]] = {}
        self.captures: dict[str, dict[int, torch.Tensor]] = {}  # capture id -> layer -> states
        self.captures_done: set[str] = set()
        self._parked: list[_Live] = []  # broken requests waiting for room to be recomputed
        self._finished = 0

    # ------------------------------------------------------------ BatchSession

    def admits(self, request: BackendRequest) -> bool:
        return True

    def add(self, requests: Sequence[BackendRequest]) -> None:
        for request in requests:
            seed = request.sampling.seed
            if seed is None and not request.sampling.greedy and request.correction is not None:
                seed = random.getrandbits(62)  # the references must draw what it draws
            live = _Live(request, seed)
            self._live[request.id] = live
            self._submit(live)

    @property
    def busy(self) -> bool:
        return bool(self._live) or len(self.captures_done) < len(self.captures)

    def abort(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is not None:
            self._cancel(live)
            if live in self._parked:
                self._parked.remove(live)

    def step(self) -> list[StepEvent]:
        backend = self._backend
        with backend.lock:
            if not self.inbox:
                for output in backend.engine.step():
                    owner = backend.mailboxes.get(output.request_id)
                    if owner is not None:
                        owner.inbox.append(output)
            if self.captures or any(live.sample for live in self._live.values()):
                for rid, report in backend.reports().items():
                    owner = backend.mailboxes.get(rid)
                    if owner is not None:
                        owner.report_box.setdefault(rid, {}).update(report)
            outputs, self.inbox = self.inbox, []
            reports, self.report_box = self.report_box, {}
        events: list[StepEvent] = []
        for rid, report in reports.items():  # first: a broken step's tokens are never passed on
            if rid in self.captures:
                self.captures[rid].update(report.get("states", {}))
                continue
            request_id, _, tries = rid.rpartition("@")
            live = self._live.get(request_id)
            if live is None or int(tries) != live.tries or live in self._parked:
                continue  # an earlier try's report
            if "live_norm" in report:
                live.live_norm = report["live_norm"]
            if "broken" in report:
                events += self._recompute(live, str(report["broken"]))
        touched = {live.request.id: live for live in map(self._take, outputs) if live}
        for live in touched.values():
            events += self._agreed(live) if live.sample else self._pass_on(live, "main")
        self._unpark()
        return events

    def _unpark(self) -> None:
        """Recompute parked requests once another request has finished since they broke, or
        at once when nothing else runs."""
        running = len(self._live) - len(self._parked)
        ready = [live for live in self._parked if live.parked_at < self._finished]
        if not ready and self._parked and running == 0:
            ready = self._parked[:1]
        for live in ready:
            self._parked.remove(live)
            if live.request.id in self._live:
                self._submit(live)

    # ------------------------------------------------------------ requests

    def _submit(self, live: _Live) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        backend, request = self._backend, live.request
        live.tries += 1
        live.tokens, live.finish, live.logprobs = {}, {}, []
        s, c = request.sampling, request.correction
        structured = None
        if request.constraint is not None:
            structured = StructuredOutputsParams(grammar=backend.grammar(request.constraint))
        renderings: dict[Role, Any] = {"main": request.rendering}
        tag = f"{request.id}@{live.tries}"  # the workers report by it
        spec = GuardSpec(tag)
        if c is not None:
            shift = None if c.shift is None else backend.register_shift(c.shift)
            spec = GuardSpec(
                tag,
                alpha=c.alpha,
                layers=c.shape.layers,
                positions=c.shape.positions,
                incremental=c.shape.stacking == "incremental",
                shift=shift,
                sample=c.references is not None,
            )
            if c.references is not None:
                renderings["corrupted"], renderings["text"] = c.references
        order: tuple[Role, ...] = ("main", "corrupted", "text") if structured else _ROLES
        roles = [role for role in order if role in renderings]  # (see the module docstring)
        for role in roles:
            rid = f"{tag}:{role}"
            role_spec = GuardSpec(**{**spec.__dict__, "role": role})
            params = SamplingParams(
                max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k or 0,
                min_p=s.min_p,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty,
                logit_bias=dict(s.logit_bias) or None,
                seed=live.seed,
                logprobs=s.logprobs if role == "main" else None,
                stop_token_ids=sorted(backend.stop_token_ids()),
                structured_outputs=structured if role == "main" else None,
                output_kind=RequestOutputKind.DELTA,
                extra_args=None if c is None else role_spec.extra_args(),
            )
            prompt = backend.prompt(renderings[role])
            if role == "main" and c is not None:
                prompt["cache_salt"] = _salt(spec, prompt)
            live.ids[role] = rid
            live.tokens[role] = []
            with backend.lock:
                backend.mailboxes[rid] = self
                backend.engine.add_request(rid, prompt, params)
                if role == "main" and structured is not None and len(roles) > 1:
                    backend.await_grammar(rid)  # before its references can be scheduled
        backend.mailboxes[tag] = self

    def capture(self, prompts: Sequence[dict[str, Any]], span: int) -> list[str]:
        """Run ``prompts`` one token each, reporting the residual stream of every layer at
        their last ``span`` prompt positions (into :attr:`captures`); their ids."""
        from vllm import SamplingParams

        ids = []
        for prompt in prompts:
            rid = uuid.uuid4().hex
            spec = GuardSpec(rid, role="capture", capture=span)
            params = SamplingParams(max_tokens=1, extra_args=spec.extra_args())
            self.captures[rid] = {}
            with self._backend.lock:
                self._backend.mailboxes[rid] = self
                self._backend.mailboxes[f"{rid}@0:capture"] = self
                self._backend.engine.add_request(f"{rid}@0:capture", prompt, params)
            ids.append(rid)
        return ids

    def _cancel(self, live: _Live) -> None:
        backend = self._backend
        with backend.lock:
            backend.engine.abort_request(list(live.ids.values()))
            for rid in live.ids.values():
                backend.mailboxes.pop(rid, None)
            backend.mailboxes.pop(f"{live.request.id}@{live.tries}", None)

    def _take(self, output: Any) -> _Live | None:
        """Record one engine output; the request it belongs to (None for a cancelled try)."""
        rid, _, role = output.request_id.rpartition(":")
        request_id, _, tries = rid.rpartition("@")
        if role == "capture":
            self.captures_done.add(request_id)
            return None
        live = self._live.get(request_id)
        if live is None or int(tries) != live.tries:
            return None
        completion = output.outputs[0]
        if role == "main" and output.prompt_token_ids:
            live.prompt_len = len(output.prompt_token_ids)  # image tokens expanded
        live.tokens[role] += list(completion.token_ids)
        if role == "main" and completion.logprobs:
            live.logprobs += [
                _logprob(token, ranked, live.request.sampling.logprobs or 0)
                for token, ranked in zip(completion.token_ids, completion.logprobs, strict=True)
            ]
        if completion.finish_reason is not None:
            live.finish[role] = str(completion.finish_reason)
        return live

    def _agreed(self, live: _Live) -> list[StepEvent]:
        """A sample-level request's tokens, as far as all three of its rows agree."""
        rows = [live.tokens[role] for role in _ROLES]
        n = min(len(r) for r in rows)
        if any(r[:n] != rows[2][:n] for r in rows[:2]):
            return self._recompute(live, "a reference row sampled a different token")
        finished = len(live.finish) == len(_ROLES) and all(len(r) == n for r in rows)
        return self._pass_on(live, "main", n, finished)

    def _pass_on(
        self, live: _Live, role: Role, upto: int | None = None, finished: bool = True
    ) -> list[StepEvent]:
        tokens = live.tokens[role][:upto]
        finish = live.finish.get(role) if finished else None
        stops = self._backend.stops
        common = min(len(tokens), len(live.sent))
        if tokens[:common] != live.sent[:common]:
            return self._fail(live, "the recomputation diverged from the tokens already sent")
        new = tokens[len(live.sent) :]
        events = []
        for token in new:
            at = len(live.sent)
            live.sent.append(token)
            if token in stops:
                continue
            logprob = live.logprobs[at] if at < len(live.logprobs) else None
            events.append(self._event(live, token, logprob=logprob))
        if finish is not None:
            reason: Finish = "length" if finish == "length" else "stop"
            if finish == "abort":
                return events + self._fail(live, "vLLM aborted the request")
            events.append(self._event(live, None, reason))
            self._done(live)
        return events

    def _event(
        self,
        live: _Live,
        token: int | None,
        finish: Finish | None = None,
        error: Any = None,
        logprob: TokenLogprob | None = None,
    ) -> StepEvent:
        first, live.first = live.first, False
        return StepEvent(
            live.request.id,
            token,
            self._id,
            finish,
            live.live_norm if first or finish else None,
            live.prompt_len if first else None,
            error,
            tuple(live.notes) if finish is not None else (),
            logprob,
        )

    def _recompute(self, live: _Live, reason: str) -> list[StepEvent]:
        self._cancel(live)
        if live.tries >= MAX_TRIES:
            return self._fail(live, f"sample-level lockstep lost {live.tries} times: {reason}")
        live.notes.append(f"lockstep broken after {len(live.sent)} tokens ({reason}): recomputed")
        live.parked_at = self._finished
        self._parked.append(live)
        return []

    def _fail(self, live: _Live, reason: str) -> list[StepEvent]:
        self._cancel(live)
        live.notes.append(reason)
        error = GuardUnavailableError(f"the guard could not follow this request: {reason}")
        event = self._event(live, None, "aborted", error)
        self._live.pop(live.request.id, None)
        self._finished += 1
        return [event]

    def _done(self, live: _Live) -> None:
        self._finished += 1
        self._live.pop(live.request.id, None)
        self._cancel(live)


def _logprob(token: int, ranked: dict[int, Any], top: int) -> TokenLogprob:
    """One token's log-probability from vLLM's ``{token id: Logprob}`` of its position."""
    best = sorted((e.rank, t, e.logprob) for t, e in ranked.items() if e.rank <= top)
    return TokenLogprob(token, float(ranked[token].logprob), tuple((t, p) for _, t, p in best))


def _salt(spec: GuardSpec, prompt: dict[str, Any]) -> str:
    """The prefix-cache salt of a corrected request: its KV cache holds corrected states, which
    only a request with the same correction and the same prompt may reuse (a shorter prefix,
    or another correction, computes other states). Reference rows and unguarded requests are
    plain sequences and share the cache as usual."""
    signature = {**spec.__dict__, "rid": None, "role": None}
    blob = json.dumps([signature, prompt["prompt_token_ids"]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
