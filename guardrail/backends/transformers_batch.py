"""Continuous batching on a transformers model, with CMRM's rows and corrections per request.

A :class:`TransformersBatch` runs one decode loop over a left-padded batch and its KV cache.
Each request owns one row, and a sample-level request two more reference rows (its prompt with
the meaningless image, and without image) that are fed its tokens in lockstep. Rows are laid out
as every request's row, then the corrupted reference rows, then the text-only ones; with
reference trimming, decoder layers past the deepest edited one hold the request rows only.

New requests are prefilled on their own, then merged into the running batch between decode
steps (their cache left-padded to the common length); finished requests leave it. Where the
model's cache or inputs cannot be merged safely (sliding-window or cross-attention caches,
multi-axis rotary positions), new requests wait until the batch drains and finished rows stay
until then, each request still reported as soon as it is done.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL

from guardrail.backends.base import (
    BackendRequest,
    CorrectionShape,
    Finish,
    MeasuringBackend,
    StepEvent,
    TokenLogprob,
)
from guardrail.backends.grammar import GrammarCompiler, RequestGrammar
from guardrail.backends.hooks import (
    ChainedPlan,
    CorrectionPlan,
    LayerPlan,
    Lockstep,
    PassThrough,
    RowTrim,
    TrimState,
)
from guardrail.backends.penalties import min_p_filter, penalize


class LoopModel(MeasuringBackend, Protocol):
    """What the decode loop needs from the transformers backend that owns it."""

    model: Any
    forward_arguments: frozenset[str]
    trim_state: TrimState  # whether reference rows can skip late layers (decided once)

    def applied(self, plan: LayerPlan | None) -> AbstractContextManager[None]: ...

    def grammars(self) -> GrammarCompiler: ...


Row = tuple[str, str]  # (request id, "main" | "corrupted" | "text")
# One pass's per-row tensors: pass-through rows, α·Δ per edited layer, lockstep rows, shape.
_PassTensors = tuple[
    PassThrough | None, torch.Tensor | None, Lockstep | None, CorrectionShape | None
]
# Per-row model inputs a decode step carries, and how to pad each on the left.
_ROW_INPUTS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


@dataclass
class _Running:
    request: BackendRequest
    grammar: RequestGrammar | None
    generator: torch.Generator | None
    prompt: torch.Tensor | None  # [K, hidden] α·Δ at the prompt (dataset level), or None
    decode: torch.Tensor | None  # [K, hidden] α·Δ at generated tokens
    produced: int = 0
    done: bool = False
    prompt_ids: torch.Tensor | None = None  # kept only when a repetition penalty reads them
    answer: list[int] = field(default_factory=list)  # kept only when a penalty reads it

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def sample(self) -> bool:
        c = self.request.correction
        return c is not None and c.references is not None

    @property
    def shape(self) -> CorrectionShape | None:
        c = self.request.correction
        return None if c is None else c.shape


def row_layout(entries: Sequence[_Running], mains_only: bool = False) -> list[Row]:
    """The batch rows of ``entries``: request rows, then corrupted, then text-only references."""
    rows = [(e.id, "main") for e in entries]
    if mains_only:
        return rows
    sample = [e for e in entries if e.sample]
    return rows + [(e.id, "corrupted") for e in sample] + [(e.id, "text") for e in sample]


def stacked_shifts(vectors: torch.Tensor, layers: Sequence[int], incremental: bool) -> torch.Tensor:
    """Vectors of the edited ``layers``, as increments over the previous edited layer when
    ``incremental`` (per-layer shifts are cumulative along the residual stream)."""
    picked = vectors[list(layers)]
    if incremental:
        picked = torch.cat([picked[:1], picked[1:] - picked[:-1]])
    return picked


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry of one position's log-probabilities (``[vocab]``), with the ``top``
    most likely alternatives."""
    pairs: tuple[tuple[int, float], ...] = ()
    if top:
        best = logprobs.topk(top)
        pairs = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), pairs)


def prefill_mask(positions: str, inputs: dict[str, Any], image_token_id: int) -> torch.Tensor:
    """``[batch, seq]`` bool: the prompt positions the correction edits."""
    ids = inputs["input_ids"]
    attention = inputs.get("attention_mask")
    attention = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
    if positions == "all":
        return attention
    if positions == "text":
        return attention & (ids != image_token_id)  # type: ignore[no-any-return]
    last: torch.Tensor = torch.zeros_like(attention)
    last[:, -1] = True
    return last


class TransformersBatch:
    """A running batch on a transformers backend (see the module docstring)."""

    def __init__(self, backend: LoopModel) -> None:
        self._backend = backend
        self._model: Any = backend.model
        self._running: list[_Running] = []
        self._joining: list[_Running] = []
        self._state: dict[str, Any] = {}  # model inputs of the next decode step
        self._next: torch.Tensor | None = None  # [rows, 1] token ids fed at the next step
        self._length = 0  # sequence length held in the cache
        self._batch_id = ""
        self._mergeable = False
        self._stops = backend.stop_token_ids()
        self._decode_tensors: tuple[tuple[str, ...], _PassTensors] | None = None
        self._shares_prefill: bool | None = None  # decided by the first shared prefill

    # ----------------------------------------------------------------- protocol

    @property
    def busy(self) -> bool:
        return bool(self._joining or self._running)

    def admits(self, request: BackendRequest) -> bool:
        shape = request.correction.shape if request.correction else None
        others = {e.shape for e in [*self._running, *self._joining]} - {None}
        if shape is not None and others and others != {shape}:
            return False
        return not self._running or self._mergeable

    def add(self, requests: Sequence[BackendRequest]) -> None:
        self._joining += [self._entry(r) for r in requests]

    def abort(self, request_id: str) -> None:
        self._joining = [e for e in self._joining if e.id != request_id]
        for entry in self._running:
            if entry.id == request_id:
                entry.done = True
        self._drop_finished()

    def step(self) -> list[StepEvent]:
        if self._joining:
            return self._prefill()
        if self._running:
            return self._decode()
        return []

    def first_logits(
        self, requests: Sequence[BackendRequest], extra: LayerPlan | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One prefill of ``requests`` (nothing generated): each request's guarded logits at
        its first answer position (``[requests, vocab]`` float32) and the live ‖Δ‖ of its
        sample-level ones; ``extra`` runs after the correction (a capture)."""
        group = [self._entry(r) for r in requests]
        _, logits, norms, _, _ = self._run_prefill(group, extra)
        return logits[: len(group)], norms

    # ----------------------------------------------------------------- entries

    def _entry(self, request: BackendRequest) -> _Running:
        backend, sampling = self._backend, request.sampling
        grammar = None
        if request.constraint is not None:
            grammar = backend.grammars().matcher(request.constraint)
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=backend.device)
            seed = sampling.seed
            generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        prompt = decode = None
        c = request.correction
        if c is not None and c.shift is not None:
            incremental = c.shape.stacking == "incremental"
            prompt = c.alpha * stacked_shifts(c.shift.vectors, c.shape.layers, incremental)
            vectors = c.shift.decode_vectors
            decode = (
                None
                if vectors is None
                else c.alpha * stacked_shifts(vectors, c.shape.layers, incremental)
            )
        return _Running(request, grammar, generator, prompt, decode)

    # ----------------------------------------------------------------- steps

    def _prefill(self) -> list[StepEvent]:
        group, self._joining = self._joining, []
        if not self._running:
            self._batch_id = uuid.uuid4().hex[:12]
        try:
            state, logits, norms, length, counts = self._shared_prefill(group)
        except Exception as e:  # these requests fail; the running batch goes on
            return [StepEvent(e_.id, None, self._batch_id, "aborted", error=e) for e_ in group]
        events = self._pick(group, logits, norms, counts)
        next_ids = self._fed(group, [ev.token for ev in events])
        if self._running:
            self._merge(group, state, next_ids, length)
        else:
            self._running, self._state, self._next, self._length = group, state, next_ids, length
            self._mergeable = self._can_merge()
        self._drop_finished()
        return events

    def _shared_prefill(
        self, group: list[_Running]
    ) -> tuple[dict[str, Any], torch.Tensor, dict[str, float], int, list[int]]:
        """The prefill of ``group``, once per prefill group: the first request of each is run
        (with its reference rows) and its rows copied for the others, whose first-token logits
        are its own. Where the model's cache cannot be copied row by row, every request runs."""
        first: dict[str, str] = {}  # prefill group -> its first request
        leader_of = {e.id: first.setdefault(e.request.prefill_group or e.id, e.id) for e in group}
        leaders = [e for e in group if leader_of[e.id] == e.id]
        if len(leaders) < len(group) and self._shares_prefill is not False:
            state, logits, norms, length, counts = self._run_prefill(leaders)
            self._shares_prefill = self._can_merge(state)
            if self._shares_prefill:
                index = {e.id: i for i, e in enumerate(leaders)}
                rows = [index[leader_of[e.id]] for e in group]
                for entry, row in zip(group, rows, strict=True):
                    entry.prompt_ids = leaders[row].prompt_ids
                state, _ = self._gathered([(leaders, state, None)], group, length, leader_of)
                shared = {e.id: norms[leader_of[e.id]] for e in group if leader_of[e.id] in norms}
                return state, logits[rows], shared, length, [counts[i] for i in rows]
        state, logits, norms, length, counts = self._run_prefill(group)
        return state, logits[: len(group)], norms, length, counts

    def _decode(self) -> list[StepEvent]:
        model, entries = self._model, self._running
        assert self._next is not None
        inputs = model.prepare_inputs_for_generation(
            self._next, next_sequence_length=1, **self._state
        )
        try:
            with self._backend.applied(self._plan(entries, None)[0]):
                output = model(**inputs, return_dict=True)
        except Exception as e:
            events = [StepEvent(x.id, None, self._batch_id, "aborted", error=e) for x in entries]
            self._reset()
            return events
        self._state = self._drop_prefill_inputs(
            model._update_model_kwargs_for_generation(output, self._state, is_encoder_decoder=False)
        )
        self._length += 1
        active = [e for e in entries if not e.done]
        logits = output.logits[:, -1].float()
        index = {e.id: i for i, e in enumerate(entries)}
        events = self._pick(active, logits[[index[e.id] for e in active]], {}) if active else []
        picked = {ev.request_id: ev.token for ev in events}
        self._next = self._fed(entries, [picked.get(e.id) for e in entries])
        self._drop_finished()
        return events

    def _run_prefill(
        self, group: list[_Running], extra: LayerPlan | None = None
    ) -> tuple[dict[str, Any], torch.Tensor, dict[str, float], int, list[int]]:
        backend, model = self._backend, self._model
        renderings = [e.request.rendering for e in group]
        for role in (0, 1):
            renderings += [e.request.correction.references[role] for e in group if e.sample]  # type: ignore[union-attr, index]
        inputs: dict[str, Any] = backend.encode(renderings)
        ids = inputs.pop("input_ids")
        counts = [int(n) for n in inputs["attention_mask"][: len(group)].sum(dim=1)]
        for i, entry in enumerate(group):
            if entry.request.sampling.repetition_penalty != 1.0:
                entry.prompt_ids = ids[i][inputs["attention_mask"][i].bool()]
        state = {**inputs, "use_cache": True}
        if "logits_to_keep" in backend.forward_arguments:
            state["logits_to_keep"] = 1
        if "position_ids" in backend.forward_arguments:
            state["position_ids"] = model._prepare_position_ids_for_generation(
                ids, {**state, "input_ids": ids}
            )
        shape = self._shape_of(group)
        positions = shape.positions if shape is not None else "last"
        mask = prefill_mask(positions, {"input_ids": ids, **inputs}, backend.image_token_id)
        if state.get("attention_mask") is not None and bool((state["attention_mask"] == 1).all()):
            state["attention_mask"] = None  # as generate does: no padding, no mask
        prepared = model.prepare_inputs_for_generation(ids, is_first_iteration=True, **state)
        plan, correction = self._plan(group, mask)
        with backend.applied(plan if extra is None else ChainedPlan(plan, extra)):
            output = model(**prepared, return_dict=True)
        norms = self._live_norms(group, correction)
        state = self._drop_prefill_inputs(
            model._update_model_kwargs_for_generation(output, state, is_encoder_decoder=False)
        )
        return state, output.logits[:, -1].float(), norms, ids.shape[1], counts

    # ----------------------------------------------------------------- tokens

    def _pick(
        self,
        entries: Sequence[_Running],
        logits: torch.Tensor,
        norms: dict[str, float],
        prompt_tokens: Sequence[int] | None = None,
    ) -> list[StepEvent]:
        stops = self._stops
        events = []
        for i, (entry, scores) in enumerate(zip(entries, logits, strict=True)):
            wanted = entry.request.sampling.logprobs
            raw = None if wanted is None else scores.log_softmax(-1)
            if entry.produced < entry.request.sampling.min_new_tokens:
                scores[sorted(stops)] = -float("inf")
            token = self._choose(entry, scores)
            entry.produced += 1
            if entry.request.sampling.penalized:
                entry.answer.append(token)
            finish: Finish | None = None
            if token in stops:
                finish = "stop"
            elif entry.grammar is not None and not entry.grammar.accept(token):
                finish = "stop"  # the grammar is complete: the answer ends with it
            elif entry.produced >= entry.request.sampling.max_new_tokens:
                finish = "length"
            entry.done = finish is not None
            emitted = None if token in stops else token
            count = None if prompt_tokens is None else prompt_tokens[i]
            logprob = None
            if raw is not None and emitted is not None:
                logprob = token_logprob(raw, emitted, wanted or 0)
            events.append(
                StepEvent(
                    entry.id,
                    emitted,
                    self._batch_id,
                    finish,
                    norms.get(entry.id),
                    count,
                    logprob=logprob,
                )
            )
        return events

    @staticmethod
    def _choose(entry: _Running, scores: torch.Tensor) -> int:
        sampling = entry.request.sampling
        if sampling.penalized:
            penalize(scores, sampling, entry.prompt_ids, entry.answer)
        if entry.grammar is not None:
            entry.grammar.mask(scores)
        if sampling.greedy:
            return int(scores.argmax())
        batch = scores.unsqueeze(0)
        warpers: list[Callable[[Any, torch.Tensor], torch.Tensor]] = [
            TemperatureLogitsWarper(sampling.temperature)
        ]
        if sampling.min_p > 0:
            warpers.append(lambda _ids, s: min_p_filter(s, sampling.min_p))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        for warp in warpers:
            batch = warp(None, batch)
        probabilities = F.softmax(batch, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=entry.generator))

    def _fed(self, entries: Sequence[_Running], tokens: Sequence[int | None]) -> torch.Tensor:
        """Next input ids: each row its request's token; finished rows the pad token."""
        pad = self._backend.tokenizer.pad_token_id or 0
        by_id = {e.id: pad if t is None else t for e, t in zip(entries, tokens, strict=True)}
        ids = [by_id[request] for request, _ in row_layout(entries)]
        return torch.tensor(ids, device=self._backend.device).unsqueeze(1)

    # ----------------------------------------------------------------- the correction

    @staticmethod
    def _shape_of(entries: Sequence[_Running]) -> CorrectionShape | None:
        return next((e.shape for e in entries if e.shape is not None), None)

    def _trim_after(self, entries: Sequence[_Running]) -> int | None:
        """Layers past this one hold request rows only (None: every layer holds every row)."""
        shape = self._shape_of(entries)
        if shape is None or not shape.trim_references or self._backend.trim_state == "off":
            return None
        return shape.layers[-1]

    def _plan(
        self, entries: Sequence[_Running], mask: torch.Tensor | None
    ) -> tuple[LayerPlan | None, CorrectionPlan | None]:
        """What the hooks apply in this pass (image-free rows passed through in cross-attention
        models, then the correction), and the correction; ``mask`` marks the edited prompt
        positions of a prefill (None: a decode step, whose tensors are reused while the batch
        keeps its requests)."""
        if mask is not None:
            tensors = self._pass_tensors(entries, prefill=True)
        else:
            key = tuple(e.id for e in entries)
            if self._decode_tensors is None or self._decode_tensors[0] != key:
                self._decode_tensors = (key, self._pass_tensors(entries, prefill=False))
            tensors = self._decode_tensors[1]
        pass_through, shifts, lockstep, shape = tensors
        if shape is None or shifts is None:
            return pass_through, None
        trim = None
        after = self._trim_after(entries)
        if lockstep is not None and after is not None:
            rows, backend = len(row_layout(entries)), self._backend
            trim = RowTrim(
                after, len(entries), rows, backend.family.trim_arguments, backend.trim_state
            )
        correction = CorrectionPlan(
            shape.layers,
            shifts,
            mask,
            lockstep,
            incremental=shape.stacking == "incremental",
            trim=trim,
        )
        if pass_through is None:
            return correction, correction
        return ChainedPlan(pass_through, correction), correction

    def _pass_tensors(self, entries: Sequence[_Running], prefill: bool) -> _PassTensors:
        """The per-row tensors of a pass over ``entries``: image-free rows to pass through,
        each row's α·Δ at the edited layers, the lockstep rows, and the correction shape."""
        backend = self._backend
        rows = row_layout(entries)
        by_id = {e.id: e for e in entries}
        pass_through = None
        if backend.image_layers:
            free = [
                role == "text" or (role == "main" and not by_id[rid].request.rendering.images)
                for rid, role in rows
            ]
            if any(free) and not all(free):
                flags = torch.tensor(free, device=backend.device)
                pass_through = PassThrough(backend.image_layers, flags)
        shape = self._shape_of(entries)
        if shape is None:
            return pass_through, None, None, None
        shifts = torch.zeros(len(shape.layers), len(rows), backend.hidden_size)
        for i, entry in enumerate(entries):
            vectors = entry.prompt if prefill else entry.decode
            if vectors is not None:
                shifts[:, i] = vectors
        lockstep = None
        sample = [i for i, e in enumerate(entries) if e.sample]
        if sample:
            n, count = len(entries), len(sample)
            device, dtype = backend.device, backend.dtype
            alphas = [[entries[i].request.correction.alpha] for i in sample]  # type: ignore[union-attr]
            lockstep = Lockstep(
                main=torch.tensor(sample, device=device),
                corrupted=torch.arange(n, n + count, device=device),
                text=torch.arange(n + count, n + 2 * count, device=device),
                alpha=torch.tensor(alphas, device=device, dtype=dtype),
            )
        return pass_through, shifts.to(backend.device, backend.dtype), lockstep, shape

    def _live_norms(
        self, group: Sequence[_Running], correction: CorrectionPlan | None
    ) -> dict[str, float]:
        if correction is None:
            return {}
        trim = correction.trim
        if trim is not None and trim.state != "pending":
            self._backend.trim_state = trim.state
        norms = correction.live_norms
        if norms is None:
            return {}
        sample = [e.id for e in group if e.sample]
        return {rid: float(norm) for rid, norm in zip(sample, norms, strict=True)}

    # ----------------------------------------------------------------- rows in and out

    def _drop_prefill_inputs(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v for k, v in state.items() if k not in MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL
        }

    def _can_merge(self, state: dict[str, Any] | None = None) -> bool:
        """Whether rows of this model's batch can be joined, dropped and copied (see the module
        docstring); decided from the state a prefill left (default: the running batch's)."""
        backend, state = self._backend, self._state if state is None else state
        if backend.image_layers:
            return False
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and name not in _ROW_INPUTS:
                return False
        positions = state.get("position_ids")
        if positions is not None and positions.dim() != 2:
            return False
        cache = state.get("cache")
        layers = getattr(cache, "layers", None)
        return layers is not None and all(type(x).__name__ == "DynamicLayer" for x in layers)

    def _drop_finished(self) -> None:
        if self._running and all(e.done for e in self._running):
            self._reset()
        elif self._mergeable and any(e.done for e in self._running):
            kept = [e for e in self._running if not e.done]
            self._regroup([(self._running, self._state, self._next)], kept, self._length)

    def _merge(
        self, group: list[_Running], state: dict[str, Any], next_ids: torch.Tensor, length: int
    ) -> None:
        parts = [(self._running, self._state, self._next), (group, state, next_ids)]
        self._regroup(parts, [*self._running, *group], max(self._length, length))

    def _regroup(
        self,
        parts: Sequence[tuple[Sequence[_Running], dict[str, Any], torch.Tensor | None]],
        target: list[_Running],
        length: int,
    ) -> None:
        """Rebuild the running batch as ``target`` from the rows of ``parts`` (each a batch's
        entries, decode inputs and next ids), left-padded to ``length`` cached positions."""
        state, next_ids = self._gathered(parts, target, length)
        self._running, self._state, self._next, self._length = target, state, next_ids, length

    def _gathered(
        self,
        parts: Sequence[tuple[Sequence[_Running], dict[str, Any], torch.Tensor | None]],
        target: Sequence[_Running],
        length: int,
        origin: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The decode inputs and next ids of ``target`` from the rows of ``parts``; each
        target request's rows are those of ``origin[id]`` (default: its own)."""
        after = self._trim_after(target)
        source = origin or {}

        def gather(
            tensors: Sequence[torch.Tensor], seq_dim: int | None, mains_only: bool = False
        ) -> torch.Tensor:
            """The target's rows of per-part tensors (rows on dim 0), left-padded on
            ``seq_dim`` to the common length (masks and positions hold one more)."""
            pieces, rows = [], []
            for (entries, _, _), tensor in zip(parts, tensors, strict=True):
                if seq_dim is not None:
                    missing = length + (seq_dim != 2) - tensor.shape[seq_dim]
                    pad = [0, 0] * (tensor.dim() - 1 - seq_dim) + [missing, 0]
                    tensor = F.pad(tensor, pad) if missing > 0 else tensor
                pieces.append(tensor)
                rows += row_layout(entries, mains_only=tensor.shape[0] == len(entries))
            where = {row: i for i, row in enumerate(rows)}
            wanted = [
                where[source.get(rid, rid), role] for rid, role in row_layout(target, mains_only)
            ]
            index = torch.tensor(wanted, device=pieces[0].device)
            return torch.cat(pieces).index_select(0, index)

        state: dict[str, Any] = dict(parts[0][1])
        for name in _ROW_INPUTS:
            merging = name == "attention_mask" and len(parts) > 1  # lengths may differ
            if merging or any(p[1].get(name) is not None for p in parts):
                state[name] = gather([self._row_input(p[1], name) for p in parts], 1)
        cache = parts[0][1]["cache"]
        for index, layer in enumerate(cache.layers):
            mains_only = after is not None and index > after
            for attribute in ("keys", "values"):
                held = [getattr(p[1]["cache"].layers[index], attribute) for p in parts]
                setattr(layer, attribute, gather(held, 2, mains_only))
        state["cache"] = cache
        nexts = [p[2] for p in parts if p[2] is not None]
        return state, gather(nexts, None) if nexts else None

    def _row_input(self, state: dict[str, Any], name: str) -> torch.Tensor:
        value = state.get(name)
        if value is None and name == "attention_mask":  # dropped because it was all ones
            rows = state["position_ids"].shape[0]
            length = state["position_ids"].shape[1]
            return torch.ones(rows, length, dtype=torch.long, device=self._backend.device)
        assert isinstance(value, torch.Tensor)
        return value

    def _reset(self) -> None:
        self._running, self._state, self._next, self._length = [], {}, None, 0
