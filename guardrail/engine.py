"""GuardedVLM: a local image-text-to-text model with CMRM applied to every multimodal call."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    StoppingCriteriaList,
)

from guardrail.anchors import BUNDLED_ANCHORS, bundled_anchor_prompts
from guardrail.calibration import capture_states, dataset_shift_sums, reference_shifts
from guardrail.config import GuardConfig, Mode
from guardrail.decision import GuardDecision, log_decision
from guardrail.errors import (
    GuardrailError,
    GuardUnavailableError,
    InvalidInputError,
    ShiftMismatchError,
)
from guardrail.fingerprint import fingerprint_model
from guardrail.generation import FirstRowStreamer, ReferenceRowsDone
from guardrail.hooks import (
    CapturePlan,
    ChainedPlan,
    CorrectionPlan,
    DecoderHooks,
    Lockstep,
    RowTrim,
)
from guardrail.images import ImageInput
from guardrail.loading import default_image_size, find_decoder_layers
from guardrail.prompts import GuardRequest, Rendering, corrupted, render_request, text_only
from guardrail.trust import AnchorStats, calibrate_threshold
from shift_store import (
    CachedShiftSource,
    Lookup,
    ShiftKey,
    ShiftMeta,
    ShiftStore,
    ShiftVector,
    open_store,
)

__version__ = "0.1.0"
# Default edited layer: 5/6 of the depth (docs/defaults.md has the measurement behind it).
DEFAULT_DEPTH_NUMERATOR, DEFAULT_DEPTH_DENOMINATOR = 5, 6


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class GuardedOutput:
    """The answer to one request, with the guard's decision record."""

    text: str
    token_ids: list[int]
    decision: GuardDecision
    usage: Usage


@dataclass
class _RowPlan:
    """How one request of a batch is guarded (internal)."""

    rendering: Rendering
    decision: GuardDecision
    shift: ShiftVector | None = None


@dataclass
class _Batch:
    """A prepared batch: the request rows first, then two reference rows per sample-level row."""

    rows: list[_RowPlan]
    inputs: dict[str, torch.Tensor]
    plan: CorrectionPlan | None
    sample_rows: list[int] = field(default_factory=list)
    guard_ms: float = 0.0

    @property
    def has_references(self) -> bool:
        return bool(self.sample_rows)


class GuardedVLM:
    """A vision-language model whose multimodal calls are corrected with CMRM.

    Text-only calls pass through untouched. Every call returns a :class:`GuardDecision`, also
    logged on the ``guardrail.decisions`` logger. Safe to share between threads.
    """

    def __init__(self, model: PreTrainedModel, processor: Any,
                 config: GuardConfig | None = None) -> None:
        self._layers = find_decoder_layers(model)
        self.model = model.eval()
        self.processor = processor
        self.config = config or GuardConfig()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # last prompt token at position -1 for every row
        self.num_layers = len(self._layers)
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.fingerprint = fingerprint_model(model, self.num_layers, self.hidden_size)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(model.config, "image_token_index", None)
        self.default_image_size = default_image_size(processor)
        self.hooks = DecoderHooks(self._layers, model.get_input_embeddings(),
                                  model.get_output_embeddings())
        self._dataset_shift: ShiftVector | None = None
        self._source: CachedShiftSource | None = None
        self.layer_indices(self.config)  # validate the configured layers now

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: GuardConfig | None = None, *,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, revision: str | None = None,
                        store: ShiftStore | str | None = None,
                        **model_kwargs: Any) -> GuardedVLM:
        """Load a hub name or local folder through ``AutoModelForImageTextToText``.

        With ``store`` (a store or a URL for :func:`shift_store.open_store`), the dataset-level
        shift is looked up there and, on a miss, computed from the bundled anchors and stored;
        see :meth:`use_store` for other anchors.
        """
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)  # "bfloat16" -> torch.bfloat16
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, revision=revision, dtype=dtype or "auto", **model_kwargs
        )
        if device is not None:
            model = model.to(device)
        vlm = cls(model, processor, config)
        if store is not None:
            vlm.use_store(store)
        return vlm

    def with_config(self, config: GuardConfig) -> GuardedVLM:
        """A view with another config; model, hooks and dataset shift are shared, not copied."""
        view = copy.copy(self)
        view.config = config
        view.layer_indices(config)
        return view

    # ----------------------------------------------------------------- shift vectors

    @property
    def dataset_shift(self) -> ShiftVector | None:
        """The dataset-level shift in use now, if any."""
        return self._dataset_lookup().vector

    def _dataset_lookup(self) -> Lookup:
        if self._source is None:
            return Lookup(self._dataset_shift)
        lookup = self._source.current()
        if lookup.vector is None:
            return lookup
        try:
            self.check_shift(lookup.vector)
        except ShiftMismatchError as e:
            return Lookup(None, note=f"stored shift does not fit this model: {e}")
        return lookup

    def use_store(self, store: ShiftStore | str | None, *, anchor_name: str = BUNDLED_ANCHORS,
                  anchors: Iterable[str | GuardRequest] | None = None,
                  compute_on_miss: bool = True, batch_size: int = 8,
                  lock_timeout_s: float = 0.0, revalidate_s: float = 1.0) -> Lookup:
        """Take the dataset-level shift from ``store`` from now on (cached in process).

        The key is this model's fingerprint, the corruption and ``anchor_name``. On a miss, with
        ``compute_on_miss``, one process computes it from ``anchors`` (the bundled set when
        ``anchor_name`` is the bundled one) and stores it; others wait ``lock_timeout_s`` and then
        run at sample level until it appears. Returns the lookup (its ``note`` says what failed).
        """
        if store is None or isinstance(store, str):
            store = open_store(store)
        key = ShiftKey(model_id=self.fingerprint.id, corruption=self.config.corruption.tag,
                       anchor=anchor_name)
        self._dataset_shift = None
        self._source = CachedShiftSource(store, key, revalidate_s=revalidate_s)
        if anchors is None and anchor_name == BUNDLED_ANCHORS:
            anchors = bundled_anchor_prompts()
        if not compute_on_miss or anchors is None:
            return self._source.current()
        return self._source.ensure(
            lambda: self.compute_dataset_shift(anchors, batch_size=batch_size,
                                               anchor_name=anchor_name, activate=False),
            lock_timeout_s=lock_timeout_s,
        )

    def check_shift(self, shift: ShiftVector) -> None:
        """Raise :class:`ShiftMismatchError` unless ``shift`` was computed on this model."""
        expected = (self.num_layers, self.hidden_size)
        if tuple(shift.vectors.shape) != expected:
            raise ShiftMismatchError(
                f"shift has shape {tuple(shift.vectors.shape)}, model needs {expected}"
            )
        if shift.meta.model.id != self.fingerprint.id:
            raise ShiftMismatchError(
                f"shift belongs to model {shift.meta.model.name_or_path} "
                f"({shift.meta.model.id}), not {self.fingerprint.name_or_path} "
                f"({self.fingerprint.id})"
            )

    def set_dataset_shift(self, shift: ShiftVector | None) -> None:
        """Use ``shift`` for dataset-level correction (checked against this model); this detaches
        any store set with :meth:`use_store`."""
        if shift is not None:
            self.check_shift(shift)
        self._dataset_shift, self._source = shift, None

    def compute_dataset_shift(self, samples: Iterable[str | GuardRequest], *,
                              batch_size: int = 8, anchor_name: str | None = None,
                              decode_tokens: int = 8, progress: bool = True,
                              activate: bool = True) -> ShiftVector:
        """Average ``Δ = h(x, img') − h(x)`` over an anchor data set, streaming in batches.

        ``vectors`` is measured at the last prompt token; ``decode_vectors`` over the first
        ``decode_tokens`` tokens of the model's own text-only answer (0 skips them, and decode
        steps are then not corrected). With ``activate`` the result becomes this model's
        dataset-level shift.
        """
        sums = dataset_shift_sums(self, samples, batch_size=batch_size,
                                  decode_tokens=decode_tokens, progress=progress)
        n = sums.count
        mean = sums.text_sum / n
        std = (sums.text_square_sum / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        mean, std = mean.float(), std.float()
        meta = ShiftMeta(
            model=self.fingerprint, level="dataset", corruption=self.config.corruption.tag,
            anchor_name=anchor_name, anchor_size=n, library_version=__version__,
            anchor_distance_threshold=calibrate_threshold(mean, std, sums.text_sample),
        )
        shift = ShiftVector(
            vectors=(sums.prompt / n).float(), meta=meta, anchor_mean=mean, anchor_std=std,
            decode_vectors=None if sums.decode is None else (sums.decode / n).float(),
        )
        if activate:
            self.set_dataset_shift(shift)
        return shift

    def compute_sample_shift(self, prompt: str | Sequence[dict], images: Sequence[ImageInput] = (),
                             ) -> ShiftVector:
        """``Δ`` at the last prompt token of this very input (two prefill-only passes).

        Generation does not need this: sample-level rows measure their shift inside the
        generation pass itself, at every generated token.
        """
        rendering = render_request(GuardRequest(prompt, images))
        delta = reference_shifts(self, [rendering])[0][:, 0, 0].cpu()
        meta = ShiftMeta(model=self.fingerprint, level="sample", anchor_size=1,
                         corruption=self.config.corruption.tag, library_version=__version__)
        return ShiftVector(vectors=delta.float().contiguous(), meta=meta)

    def anchor_stats(self) -> AnchorStats | None:
        """Anchor statistics of the dataset-level shift in use (for the trust policy)."""
        shift = self.dataset_shift
        if shift is None or shift.anchor_mean is None or shift.anchor_std is None:
            return None
        return AnchorStats(shift.anchor_mean, shift.anchor_std,
                           shift.meta.anchor_distance_threshold or float("inf"))

    def text_state(self, request: GuardRequest) -> torch.Tensor:
        """Final-layer text-only state of the request's last prompt token (one prefill)."""
        rendering = text_only(render_request(request))
        return capture_states(self, [rendering])[-1, 0, 0]

    # ----------------------------------------------------------------- generation

    def layer_indices(self, config: GuardConfig) -> list[int]:
        """The configured layers as sorted non-negative indices."""
        if config.layers is None:
            return [DEFAULT_DEPTH_NUMERATOR * self.num_layers // DEFAULT_DEPTH_DENOMINATOR]
        indices = sorted({i % self.num_layers for i in config.layers
                          if -self.num_layers <= i < self.num_layers})
        if len(indices) != len(set(config.layers)) or not indices:
            raise InvalidInputError(
                f"layers {list(config.layers)} out of range for {self.num_layers} decoder layers"
            )
        return indices

    def generate(self, prompt: str | Sequence[dict], images: Sequence[ImageInput] = (), *,
                 alpha: float | None = None, mode: Mode | None = None,
                 shift: ShiftVector | None = None, **generation: Any) -> GuardedOutput:
        """Generate one guarded answer. ``generation`` goes to ``model.generate``."""
        request = GuardRequest(prompt, images, alpha=alpha, mode=mode, shift=shift)
        return self.generate_batch([request], **generation)[0]

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GuardRequest], *, max_new_tokens: int = 128,
                       **generation: Any) -> list[GuardedOutput]:
        """Generate for several requests in one batched pass, each with its own correction."""
        if not requests:
            return []
        batch = self._prepare(requests)
        generation = {"do_sample": False, **generation, "max_new_tokens": max_new_tokens,
                      "use_cache": True}
        generation.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if batch.has_references:
            criteria = StoppingCriteriaList(generation.pop("stopping_criteria", None) or [])
            criteria.append(ReferenceRowsDone(len(batch.rows)))
            generation["stopping_criteria"] = criteria
            if generation.get("streamer") is not None:
                generation["streamer"] = FirstRowStreamer(generation["streamer"])
        with self._activate(batch.plan):
            output = self.model.generate(**batch.inputs, **generation)
        self._record_live_norms(batch)
        return self._outputs(batch, output)

    @torch.no_grad()
    def next_token_logits(self, requests: Sequence[GuardRequest],
                          ) -> tuple[torch.Tensor, list[GuardDecision]]:
        """Guarded logits at the first generated position (``[batch, vocab]`` float32)."""
        batch = self._prepare(requests)
        with self._activate(batch.plan):
            logits = self.model(**batch.inputs, use_cache=True, logits_to_keep=1).logits
        self._record_live_norms(batch)
        return logits[: len(batch.rows), -1].float(), [row.decision for row in batch.rows]

    @torch.no_grad()
    def final_states(self, requests: Sequence[GuardRequest]) -> torch.Tensor:
        """Last decoder layer's output at the last prompt token, after any correction:
        ``[batch, hidden]`` float32 (the representation the paper's plots show)."""
        batch = self._prepare(requests)
        capture = CapturePlan([self.num_layers - 1])
        with self.hooks.activate(ChainedPlan(batch.plan, capture)):
            self.model(**batch.inputs, use_cache=False, logits_to_keep=1)
        return capture.stacked([self.num_layers - 1])[0, : len(batch.rows), 0].cpu()

    def _prepare(self, requests: Sequence[GuardRequest]) -> _Batch:
        started = time.perf_counter()
        rows = [self._plan_row(request) for request in requests]
        sample_rows = [i for i, row in enumerate(rows) if row.decision.mode_used == "sample"]
        spec, size = self.config.corruption, self.default_image_size
        renderings = [row.rendering for row in rows]
        renderings += [corrupted(rows[i].rendering, spec, size) for i in sample_rows]
        renderings += [text_only(rows[i].rendering) for i in sample_rows]
        inputs = self.encode(renderings)
        plan = self._correction_plan(rows, sample_rows, inputs)
        return _Batch(rows, inputs, plan, sample_rows, (time.perf_counter() - started) * 1e3)

    def _activate(self, plan: CorrectionPlan | None) -> AbstractContextManager[None]:
        return nullcontext() if plan is None else self.hooks.activate(plan)

    def _record_live_norms(self, batch: _Batch) -> None:
        if batch.plan is not None and batch.plan.live_norms is not None:
            for j, i in enumerate(batch.sample_rows):
                batch.rows[i].decision.shift_norm = float(batch.plan.live_norms[j])

    def record_refusal(self, error: GuardrailError, app: str | None = None) -> None:
        """Log a ``refused`` decision for a request rejected as bad input, and attach it to
        ``error`` (so that the caller gets the typed error and the record)."""
        cfg = self.config
        decision = GuardDecision(
            call_id=uuid.uuid4().hex, app=app, model=self.fingerprint.id, multimodal=True,
            guarded=False, mode_requested=cfg.mode, mode_used="refused", alpha=cfg.alpha,
            layers=self.layer_indices(cfg), positions=cfg.positions, stacking=cfg.stacking,
            reason=f"input refused: {type(error).__name__}: {error}",
        )
        log_decision(decision)
        error.decision = decision

    def _plan_row(self, request: GuardRequest) -> _RowPlan:
        cfg = self.config
        try:
            rendering = render_request(request)
        except InvalidInputError as e:
            self.record_refusal(e, request.app)
            raise
        requested = mode = request.mode or cfg.mode
        alpha = cfg.alpha if request.alpha is None else float(request.alpha)
        if request.trusted is False and mode in ("auto", "dataset"):
            mode = "sample"  # untrusted input: a shift measured on this very input
        decision = GuardDecision(
            call_id=uuid.uuid4().hex, app=request.app, model=self.fingerprint.id,
            trusted=request.trusted, trust_reason=request.trust_reason,
            multimodal=rendering.multimodal, guarded=False, mode_requested=requested,
            mode_used="text-only", alpha=alpha, layers=self.layer_indices(cfg),
            positions=cfg.positions, stacking=cfg.stacking, reason="no image: passed through",
        )
        row = _RowPlan(rendering, decision)
        if not rendering.multimodal:
            return row
        if mode == "off" or alpha == 0.0:
            decision.mode_used, decision.reason = "off", f"mode={mode}, alpha={alpha}"
            return row
        shift = request.shift
        if shift is None and mode in ("dataset", "auto"):
            lookup = self._dataset_lookup()
            shift = lookup.vector
            if lookup.note:
                decision.fallbacks.append(lookup.note)
            if shift is not None and self._source is not None:
                decision.shift_key, decision.shift_version = self._source.key.name, lookup.version
        if mode in ("dataset", "auto") and shift is not None:
            self.check_shift(shift)
            row.shift = shift
            decision.mode_used, decision.guarded = "dataset", True
            decision.reason = "dataset-level shift"
        elif mode == "dataset":
            self._unavailable(decision, "mode=dataset but no dataset-level shift is available")
        else:
            if mode == "auto":
                decision.fallbacks.append("no dataset-level shift available: sample level")
            decision.mode_used, decision.guarded = "sample", True
            decision.reason = "sample-level shift"
        return row

    def _unavailable(self, decision: GuardDecision, why: str) -> None:
        decision.fallbacks.append(why)
        decision.guarded, decision.mode_used = False, "unguarded"
        decision.reason = f"guard unavailable: {why}"
        if self.config.on_unavailable == "fail_closed":
            decision.reason += " (failed closed)"
            log_decision(decision)
            raise GuardUnavailableError(decision.reason, decision)
        decision.reason += " (answered unguarded by configuration)"

    def _stacked(self, vectors: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Vectors of the edited layers, as increments when stacking is incremental."""
        picked = vectors[layers]
        if self.config.stacking == "incremental":
            picked = torch.cat([picked[:1], picked[1:] - picked[:-1]])
        return picked

    def _correction_plan(self, rows: list[_RowPlan], sample_rows: list[int],
                         inputs: dict[str, torch.Tensor]) -> CorrectionPlan | None:
        """Per-row ``α·Δ`` at the edited layers; None when no row is guarded."""
        if not any(row.decision.guarded for row in rows):
            return None
        layers = self.layer_indices(self.config)
        total = inputs["input_ids"].shape[0]
        prompt = torch.zeros(len(layers), total, self.hidden_size)
        decode = torch.zeros(len(layers), total, self.hidden_size)
        for i, row in enumerate(rows):
            if row.decision.mode_used != "dataset" or row.shift is None:
                continue
            alpha = row.decision.alpha
            row.decision.shift_id = row.shift.checksum[:12]
            row.decision.shift_level = row.shift.meta.level
            row.decision.shift_norm = float(row.shift.vectors[layers[-1]].norm())
            prompt[:, i] = alpha * self._stacked(row.shift.vectors, layers)
            if row.shift.decode_vectors is not None:
                decode[:, i] = alpha * self._stacked(row.shift.decode_vectors, layers)
            else:
                row.decision.fallbacks.append("shift has no decode vectors: prompt only")
        device, dtype = self.model.device, self.model.dtype
        lockstep = trim = None
        if sample_rows:
            count, n = len(sample_rows), len(rows)
            alphas = [[rows[i].decision.alpha] for i in sample_rows]
            lockstep = Lockstep(
                main=torch.tensor(sample_rows, device=device),
                corrupted=torch.arange(n, n + count, device=device),
                text=torch.arange(n + count, n + 2 * count, device=device),
                alpha=torch.tensor(alphas, device=device, dtype=dtype),
            )
            for i in sample_rows:
                rows[i].decision.shift_level = "sample"
            if self.config.trim_references:
                trim = RowTrim(after=layers[-1], keep=n, total=total)
        return CorrectionPlan(
            layers, prompt.to(device, dtype), decode.to(device, dtype),
            self._prefill_mask(inputs), lockstep,
            incremental=self.config.stacking == "incremental", trim=trim,
        )

    def encode(self, renderings: Sequence[Rendering],
               continuation: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Processor inputs for ``renderings`` (left-padded), with ``continuation`` ids
        (``[batch, k]``) appended to every row when given."""
        texts = [
            self.processor.apply_chat_template(r.messages, add_generation_prompt=True,
                                               tokenize=False)
            for r in renderings
        ]
        images = [image for r in renderings for image in r.images]
        inputs = self.processor(text=texts, images=images or None, padding=True,
                                return_tensors="pt")
        if continuation is not None:
            inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation], dim=1)
            inputs["attention_mask"] = torch.cat(
                [inputs["attention_mask"], torch.ones_like(continuation)], dim=1)
        return inputs.to(self.model.device)

    def _prefill_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        attention = inputs["attention_mask"].bool()
        if self.config.positions == "all":
            return attention
        if self.config.positions == "text":
            return attention & (inputs["input_ids"] != self.image_token_id)
        last = torch.zeros_like(attention)
        last[:, -1] = True
        return last

    def _outputs(self, batch: _Batch, output: torch.Tensor) -> list[GuardedOutput]:
        rows, guard_ms = batch.rows, batch.guard_ms
        prompt_length = batch.inputs["input_ids"].shape[1]
        prompt_tokens = batch.inputs["attention_mask"].sum(dim=1).tolist()
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.pad_token_id}
        results = []
        for i, row in enumerate(rows):
            tokens = output[i, prompt_length:].tolist()
            cut = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
            tokens = tokens[:cut]
            row.decision.batch_rows = len(rows)
            if row.decision.guarded:
                row.decision.added_latency_ms = round(guard_ms, 3)
            log_decision(row.decision)
            results.append(GuardedOutput(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                token_ids=tokens,
                decision=row.decision,
                usage=Usage(prompt_tokens=prompt_tokens[i], completion_tokens=len(tokens),
                            total_tokens=prompt_tokens[i] + len(tokens)),
            ))
        return results
