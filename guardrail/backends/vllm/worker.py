"""CMRM inside vLLM's workers: each request's own correction, in continuous batching.

vLLM loads :class:`GuardWorkerExtension` into every worker (``worker_extension_cls``); its
``cmrm_*`` methods are called through ``collective_rpc``, so tensor- and pipeline-parallel
executors work as they do for any extension. A request's correction rides in
``SamplingParams.extra_args["cmrm"]`` (a :class:`GuardSpec`); dataset-level shifts are
registered once per worker by id.

Before each forward pass, the runner's own layout of the step (its ``input_batch.req_ids``,
``query_start_loc`` and ``num_computed_tokens``) maps the flattened token batch back to
requests, and a :class:`StepPlan` says which tokens each edited layer changes. A hook on every
decoder layer then edits the **residual stream** (vLLM layers return ``(hidden, residual)``, and
the stream is their sum: the same quantity the transformers backend corrects) of those tokens
only: unguarded and text-only requests in the same step are untouched.

Sample level runs the request and its two reference sequences (corrupted image, text only) as
three vLLM requests that must be scheduled in the same steps: the live shift is read from the
reference rows at each edited layer and subtracted from the request's row in the same pass, and
the reference rows are given the request's logits (after its grammar mask, just before
sampling), so that they sample (with the same seed) the request's own token. A step that runs
the three out of line (chunked prefill, preemption, a full KV cache) breaks the lockstep:
nothing is applied to that request, and the break is reported (``cmrm_reports``) so that the
backend never passes on a token computed without its shift.

vLLM internals used (pinned version, see the README): ``GPUModelRunner._prepare_inputs``,
``input_batch.req_ids``, ``input_batch.num_computed_tokens_cpu``, ``query_start_loc.cpu``,
``requests[id].sampling_params / prompt_token_ids / num_prompt_tokens``,
``GPUModelRunner._sample`` (logits in ``input_batch`` order, grammar mask applied), the model's
``get_language_model().model.layers``; eager mode (the hooks are not captured in CUDA graphs).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

KEY = "cmrm"
Role = Literal["main", "corrupted", "text", "capture"]


Packed = tuple[list[int], bytes]  # a float32 array as its shape and bytes


def pack(tensor: torch.Tensor) -> Packed:
    """A tensor in a form that crosses vLLM's process boundaries (its RPC serialiser does not
    carry tensors)."""
    array = tensor.detach().float().cpu().numpy()
    return list(array.shape), array.tobytes()


def unpack(packed: Packed) -> torch.Tensor:
    shape, data = packed
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(shape).copy())


@dataclass(frozen=True)
class GuardSpec:
    """The correction of one vLLM request (``extra_args["cmrm"]``). ``rid`` is the guard's
    request id (a reference row carries its request's id); ``shift`` a registered shift id
    (dataset level); ``sample`` marks a request row whose references run beside it;
    ``capture`` (role ``capture``) the number of last prompt positions whose states to report."""

    rid: str
    role: Role = "main"
    alpha: float = 0.0
    layers: tuple[int, ...] = ()
    positions: str = "last"
    incremental: bool = True
    shift: str | None = None
    sample: bool = False
    capture: int = 0

    def extra_args(self) -> dict[str, Any]:
        return {KEY: {**asdict(self), "layers": list(self.layers)}}

    @classmethod
    def of(cls, params: Any) -> GuardSpec | None:
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(KEY)
        if raw is None:
            return None
        return cls(**{**raw, "layers": tuple(raw["layers"])})


@dataclass
class _Row:
    """One request's tokens in this step."""

    spec: GuardSpec
    index: int  # its row in the step's logits
    start: int  # its first token in the flattened batch
    positions: np.ndarray  # absolute positions of its tokens in this step
    prompt_len: int
    prompt_ids: np.ndarray

    def answer_offsets(self) -> set[int]:
        """Offsets ``p - (prompt_len - 1)`` >= 0 of its tokens: the last prompt token is 0, the
        k-th generated token k (the positions sample level corrects, whatever ``positions``)."""
        offsets = self.positions - (self.prompt_len - 1)
        return set(offsets[offsets >= 0].tolist())

    def edited(self, positions: str, image_token_id: int) -> np.ndarray:
        """Indices (within this row's tokens) that ``positions`` edits."""
        p = self.positions
        if positions == "all":
            keep = np.ones_like(p, dtype=bool)
        elif positions == "text":
            in_prompt = p < self.prompt_len
            tokens = self.prompt_ids[np.minimum(p, self.prompt_len - 1)]
            keep = ~in_prompt | (tokens != image_token_id)
        else:
            keep = p >= self.prompt_len - 1
        return np.nonzero(keep)[0]


@dataclass
class _Triple:
    """A sample-level request and its reference rows, lined up in this step: token indices
    in the flattened batch, built once per step for every edited layer's hook."""

    main: _Row
    corrupted: torch.Tensor  # [n] the corrupted row's tokens at the n answer offsets
    text: torch.Tensor  # [n] the text-only row's tokens at the same offsets
    edited: torch.Tensor  # [m] the request's edited tokens
    pick: torch.Tensor  # [m] which of the n offsets each edited token takes its shift from
    last_offset: int | None  # position in the n offsets of the last prompt token (offset 0)


@dataclass
class StepPlan:
    """Which tokens of this step each layer edits, and how."""

    dataset: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    triples: list[_Triple] = field(default_factory=list)
    captures: list[_Row] = field(default_factory=list)
    capture_layers: int = -1
    force: list[tuple[int, list[int]]] = field(default_factory=list)  # logits row copies
    hooked: frozenset[int] = frozenset()


class GuardState:
    """The worker's side of the guard: registered shifts, the current step's plan, and the
    reports (captured states, live ‖Δ‖, broken lockstep) the backend collects."""

    def __init__(self, model: Any, image_token_id: int) -> None:
        language = model.get_language_model() if hasattr(model, "get_language_model") else model
        self.layers = list(language.model.layers)
        self.image_token_id = image_token_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.shifts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.plan = StepPlan()
        self.reports: dict[str, dict[str, Any]] = defaultdict(dict)
        self._live: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if isinstance(layer, nn.Module) and type(layer).__name__ != "PPMissingLayer":
                layer.register_forward_hook(self._hook(index))

    def forced(self, logits: torch.Tensor | None) -> None:
        """Give reference rows their request's logits (after its grammar mask), in place. The
        image placeholder token is ruled out in all three rows: it is never an answer, and it is
        the only token whose repetition penalty differs between them (the text-only reference
        has no image in its prompt), so the sampler then treats the three rows alike."""
        if logits is not None:
            for source, targets in self.plan.force:
                logits[source, self.image_token_id] = -float("inf")
                logits[targets] = logits[source].clone()

    # ------------------------------------------------------------ the step's plan

    def begin_step(self, runner: Any, scheduled: np.ndarray) -> None:
        """Build the plan of the step the runner is about to run (``scheduled`` tokens per
        request, in ``runner.input_batch.req_ids`` order)."""
        plan = StepPlan()
        starts = np.concatenate([[0], np.cumsum(scheduled)])
        computed = runner.input_batch.num_computed_tokens_cpu
        groups: dict[str, dict[Role, _Row]] = defaultdict(dict)
        for i, req_id in enumerate(runner.input_batch.req_ids[: len(scheduled)]):
            state = runner.requests[req_id]
            spec = GuardSpec.of(state.sampling_params)
            if spec is None or scheduled[i] == 0:
                continue
            first = int(computed[i])
            row = _Row(
                spec,
                i,
                int(starts[i]),
                np.arange(first, first + int(scheduled[i])),
                int(state.num_prompt_tokens),
                np.asarray(state.prompt_token_ids or [], dtype=np.int64),
            )
            groups[spec.rid][spec.role] = row
        dataset: dict[int, list[tuple[np.ndarray, torch.Tensor]]] = defaultdict(list)
        for rid, rows in groups.items():
            if "capture" in rows:
                plan.captures.append(rows["capture"])
                continue
            main = rows.get("main")
            if main is None or not main.spec.sample:
                if main is not None and main.spec.shift is not None:
                    self._dataset_edits(main, dataset)
                if main is None and ("corrupted" in rows or "text" in rows):
                    self._check_orphans(rid, rows)
                continue
            self._line_up(rid, rows, plan)
        for layer, parts in dataset.items():
            index = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(self.device)
            plan.dataset[layer] = (index, torch.cat([p[1] for p in parts]))
        if plan.captures:
            plan.capture_layers = len(self.layers) - 1
        hooked = set(plan.dataset)
        for triple in plan.triples:
            hooked.update(triple.main.spec.layers)
        plan.hooked = frozenset(hooked)
        self.plan = plan

    def _dataset_edits(
        self, row: _Row, dataset: dict[int, list[tuple[np.ndarray, torch.Tensor]]]
    ) -> None:
        spec = row.spec
        assert spec.shift is not None
        if spec.shift not in self.shifts:
            self.reports[spec.rid]["broken"] = f"shift {spec.shift} is not registered"
            return
        prompt, decode = self.shifts[spec.shift]
        local = row.edited(spec.positions, self.image_token_id)
        generated = row.positions[local] >= row.prompt_len
        if decode is None:  # no decode vectors: generated tokens stay uncorrected
            local, generated = local[~generated], generated[~generated]
        if local.size == 0:
            return
        layers = list(spec.layers)
        on_generated = torch.from_numpy(generated).to(self.device).unsqueeze(1)

        def scaled(table: torch.Tensor, k: int) -> torch.Tensor:
            v = table[layers[k]]
            if spec.incremental and k > 0:
                v = v - table[layers[k - 1]]
            return spec.alpha * v

        for k, layer in enumerate(layers):
            rows = scaled(prompt, k).expand(local.size, -1)
            if decode is not None:
                rows = torch.where(on_generated, scaled(decode, k), rows)
            dataset[layer].append((row.start + local, rows))

    def _check_orphans(self, rid: str, rows: dict[Role, _Row]) -> None:
        """Reference rows that run past their prompt without their request: out of line."""
        if any(row.answer_offsets() for row in rows.values()):
            self.reports[rid]["broken"] = "reference rows ran without their request"

    def _line_up(self, rid: str, rows: dict[Role, _Row], plan: StepPlan) -> None:
        main, c, t = rows["main"], rows.get("corrupted"), rows.get("text")
        wanted = main.answer_offsets()
        local = main.edited(main.spec.positions, self.image_token_id)
        needs = bool(wanted) or local.size > 0
        if not needs and not any(r.answer_offsets() for r in (c, t) if r is not None):
            return  # an early prefill chunk of all three: nothing to edit yet
        if c is None or t is None:
            self.reports[rid]["broken"] = "the request ran without its reference rows"
            return
        if not wanted or c.answer_offsets() != wanted or t.answer_offsets() != wanted:
            self.reports[rid]["broken"] = (
                f"reference rows out of step (request at {sorted(wanted)}, references at "
                f"{sorted(c.answer_offsets())} / {sorted(t.answer_offsets())})"
            )
            return
        answer = sorted(wanted)  # the same offsets in all three rows

        def tokens(ref: _Row) -> torch.Tensor:
            first = ref.start + (ref.prompt_len - 1) - int(ref.positions[0])  # offset 0
            return torch.tensor([first + o for o in answer], device=self.device)

        # prompt positions take the last prompt token's shift
        sources = np.maximum(main.positions[local] - (main.prompt_len - 1), 0)
        where = {o: n for n, o in enumerate(answer)}
        plan.triples.append(
            _Triple(
                main,
                tokens(c),
                tokens(t),
                torch.from_numpy(main.start + local).to(self.device),
                torch.tensor([where[int(s)] for s in sources], device=self.device),
                where.get(0),
            )
        )
        if max(wanted) == int(main.positions[-1]) - (main.prompt_len - 1):
            plan.force.append((main.index, [c.index, t.index]))

    # ------------------------------------------------------------ the hooks

    def _hook(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            plan = self.plan
            if plan.captures and index <= plan.capture_layers:
                self._capture(index, output)
            if index not in plan.hooked:
                return None
            hidden, residual = output
            edit = plan.dataset.get(index)
            if edit is not None:
                residual.index_add_(0, edit[0], edit[1].to(residual.dtype), alpha=-1.0)
            for triple in plan.triples:
                if index in triple.main.spec.layers:
                    self._live_edit(index, triple, hidden, residual)
            return None

        return hook

    def _capture(self, index: int, output: Any) -> None:
        hidden, residual = output
        stream = hidden if residual is None else hidden + residual
        for row in self.plan.captures:
            span = row.spec.capture
            last = row.start + len(row.positions)
            if row.positions[-1] != row.prompt_len - 1:
                continue  # not the prompt's last chunk yet
            states = pack(stream[last - span : last])
            self.reports[row.spec.rid].setdefault("states", {})[index] = states

    def _live_edit(
        self, index: int, triple: _Triple, hidden: torch.Tensor, residual: torch.Tensor
    ) -> None:
        spec = triple.main.spec
        c_rows, t_rows = triple.corrupted, triple.text
        live = (hidden[c_rows] + residual[c_rows]) - (hidden[t_rows] + residual[t_rows])
        key = spec.rid
        increment = live
        layers = list(spec.layers)
        k = layers.index(index)
        if spec.incremental and k > 0 and key in self._live:
            increment = live - self._live[key]
        self._live[key] = live
        if k == len(layers) - 1:
            self._live.pop(key, None)
            if triple.last_offset is not None:
                norm = float(live[triple.last_offset].float().norm())
                self.reports[key]["live_norm"] = norm
        residual.index_add_(0, triple.edited, spec.alpha * increment[triple.pick], alpha=-1.0)

    # ------------------------------------------------------------ registry

    def put_shift(self, shift_id: str, prompt: Packed, decode: Packed | None) -> None:
        def place(t: Packed) -> torch.Tensor:
            return unpack(t).to(self.device, self.dtype)

        self.shifts[shift_id] = (place(prompt), None if decode is None else place(decode))

    def take_reports(self) -> dict[str, dict[str, Any]]:
        reports, self.reports = dict(self.reports), defaultdict(dict)
        return reports


class GuardWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``self`` is the worker."""

    model_runner: Any

    def cmrm_setup(self, image_token_id: int) -> int:
        """Install the guard's hooks (once); returns the number of decoder layers seen."""
        runner = self.model_runner
        if getattr(runner, "_cmrm", None) is None:
            state = GuardState(runner.get_model(), image_token_id)
            prepare, sample = runner._prepare_inputs, runner._sample

            def prepare_inputs(scheduler_output: Any, scheduled: np.ndarray) -> Any:
                result = prepare(scheduler_output, scheduled)
                state.begin_step(runner, scheduled)
                return result

            def sample_tokens(logits: torch.Tensor | None, *args: Any) -> Any:
                state.forced(logits)  # after the request's grammar mask, before sampling
                return sample(logits, *args)

            runner._prepare_inputs, runner._sample = prepare_inputs, sample_tokens
            runner._cmrm = state
        return len(runner._cmrm.layers)

    def cmrm_put_shift(self, shift_id: str, prompt: Packed, decode: Packed | None) -> None:
        """Register a dataset-level shift (``[num_layers, hidden]`` each) under ``shift_id``."""
        self.model_runner._cmrm.put_shift(shift_id, prompt, decode)

    def cmrm_reports(self) -> dict[str, dict[str, Any]]:
        """What the steps since the last call reported, per guard request id."""
        return self.model_runner._cmrm.take_reports()  # type: ignore[no-any-return]
