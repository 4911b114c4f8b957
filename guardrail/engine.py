"""GuardedVLM: a local vision-language model with CMRM applied to every multimodal call.

A thin facade: the planner decides per request (``planning``), ``batching`` lays out one pass,
the backend runs it, and the decision record is built from the plan and the outcome.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guardrail import calibration
from guardrail.anchors import BUNDLED_ANCHORS, bundled_anchor_prompts
from guardrail.backends import (
    Answer,
    BackendRequest,
    CapturingBackend,
    Inputs,
    MeasuringBackend,
    Processor,
    Sampling,
    TransformersBackend,
    run_to_completion,
)
from guardrail.backends.hooks import CapturePlan
from guardrail.config import GuardConfig, Mode
from guardrail.correction import to_backend_request
from guardrail.decision import GuardDecision, log_decision
from guardrail.errors import (
    GuardrailError,
    GuardUnavailableError,
    InvalidImageError,
    InvalidInputError,
)
from guardrail.families import ModelFamily
from guardrail.images import ImageInput
from guardrail.limits import check_depth, check_images, check_prompt_tokens, parse_json
from guardrail.outputs import GuardedOutput, output_of, with_alternatives
from guardrail.planning import Outcome, RowPlan, decision_record, plan_row, refusal_record
from guardrail.plausibility import plausibility_check
from guardrail.requests import (
    GuardRequest,
    Rendering,
    reject_placeholders,
    render_request,
    text_only,
)
from guardrail.shifts import DatasetShifts, ShiftRequirements
from guardrail.trust import AnchorStats
from shift_store import Lookup, ModelFingerprint, ShiftStore, ShiftVector, open_store


class GuardedVLM:
    """A vision-language model whose multimodal calls are corrected with CMRM.

    Text-only calls pass through untouched. Every call returns a :class:`GuardDecision`, also
    logged on the ``guardrail.decisions`` logger. Safe to share between threads; views with
    another config (:meth:`with_config`) share the backend.
    """

    def __init__(
        self,
        backend: CapturingBackend,
        config: GuardConfig | None = None,
        shifts: DatasetShifts | None = None,
    ) -> None:
        self.backend = backend
        self.config = config or GuardConfig()
        self.layers = self.config.layer_indices(backend.num_layers)  # validates them
        requirements = ShiftRequirements(
            backend.fingerprint,
            self.config.corruption.tag,
            calibration_id=self.config.shift_calibration_id,
        )
        self.shifts = (shifts or DatasetShifts(requirements)).for_requirements(requirements)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        config: GuardConfig | None = None,
        *,
        family: ModelFamily | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        store: ShiftStore | str | None = None,
        **model_kwargs: Any,
    ) -> GuardedVLM:
        """Load a hub name or local folder through transformers (``family`` overrides the
        model family found from its config). With ``store`` (a store or a URL for
        :func:`shift_store.open_store`), the dataset-level shift is looked up there and, on a
        miss, computed from the bundled anchors; see :meth:`use_store` for other anchors."""
        backend = TransformersBackend.from_pretrained(
            name_or_path,
            family=family,
            device=device,
            dtype=dtype,
            revision=revision,
            **model_kwargs,
        )
        vlm = cls(backend, config)
        if store is not None:
            vlm.use_store(store)
        return vlm

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        processor: Processor,
        config: GuardConfig | None = None,
        *,
        family: ModelFamily | str | None = None,
    ) -> GuardedVLM:
        """Guard an already loaded transformers model and its processor."""
        return cls(TransformersBackend(model, processor, family), config)

    def with_config(self, config: GuardConfig) -> GuardedVLM:
        """A view with another config. The backend is shared; the dataset-level shift is shared
        when it fits the new config, else looked up under the key that fits it."""
        return GuardedVLM(self.backend, config, self.shifts)

    @property
    def model(self) -> nn.Module:
        """The backend's model (a transformers ``PreTrainedModel`` for the default backend)."""
        model: nn.Module = getattr(self.backend, "model")  # noqa: B009  (not in the protocol)
        return model

    @property
    def processor(self) -> Processor | None:
        """The backend's processor (chat template, tokenizer and image processor)."""
        return getattr(self.backend, "processor", None)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backend.tokenizer

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.backend.fingerprint

    @property
    def family(self) -> ModelFamily:
        return self.backend.family

    @property
    def num_layers(self) -> int:
        return self.backend.num_layers

    @property
    def hidden_size(self) -> int:
        return self.backend.hidden_size

    # ----------------------------------------------------------------- shift vectors

    @property
    def dataset_shift(self) -> ShiftVector | None:
        """The dataset-level shift in use now, if any."""
        return self.dataset_lookup().vector

    def dataset_lookup(self) -> Lookup:
        """The dataset-level shift and how it was found. A stored vector is checked against a
        live measurement before its first use (``GuardConfig.check_plausibility``)."""
        lookup = self.shifts.current()
        if self.shifts.source is None or not self.config.check_plausibility:
            return lookup
        return plausibility_check(self.backend, self.config.corruption).vetted(lookup)

    def use_store(
        self,
        store: ShiftStore | str | None,
        *,
        anchor_name: str = BUNDLED_ANCHORS,
        anchors: Iterable[str | GuardRequest] | None = None,
        compute_on_miss: bool = True,
        batch_size: int = 8,
        lock_timeout_s: float = 0.0,
        revalidate_s: float = 1.0,
    ) -> Lookup:
        """Take the dataset-level shift from ``store`` from now on (cached in process).

        The key is everything the shift depends on (see :class:`ShiftRequirements`) plus
        ``anchor_name``. On a miss, with ``compute_on_miss``, one process computes it from
        ``anchors`` (the bundled set when ``anchor_name`` is the bundled one) and stores it;
        others wait ``lock_timeout_s`` and then run at sample level until it appears. Returns
        the lookup (its ``note`` says what failed).
        """
        store = open_store(store) if store is None or isinstance(store, str) else store
        self.shifts = DatasetShifts.from_store(
            self.shifts.requirements, store, anchor_name, revalidate_s
        )
        if anchors is None and anchor_name == BUNDLED_ANCHORS:
            anchors = bundled_anchor_prompts()
        if compute_on_miss and anchors is not None:
            samples = anchors
            self.shifts.ensure(
                lambda: self.compute_dataset_shift(
                    samples, batch_size=batch_size, anchor_name=anchor_name, activate=False
                ),
                lock_timeout_s,
            )
        return self.dataset_lookup()

    def check_shift(self, shift: ShiftVector) -> None:
        """Raise :class:`~guardrail.errors.ShiftMismatchError` unless ``shift`` fits this
        model and config (model, shape, corruption, position, format version)."""
        self.shifts.requirements.check(shift)

    def set_dataset_shift(self, shift: ShiftVector | None) -> None:
        """Use ``shift`` for dataset-level correction (checked first); this detaches any store
        set with :meth:`use_store`."""
        if shift is not None:
            self.check_shift(shift)
        self.shifts = DatasetShifts(self.shifts.requirements, fixed=shift)

    def compute_dataset_shift(
        self,
        samples: Iterable[str | GuardRequest],
        *,
        batch_size: int = 8,
        anchor_name: str | None = None,
        decode_tokens: int = 8,
        progress: bool = True,
        activate: bool = True,
    ) -> ShiftVector:
        """Average ``Δ`` over an anchor set (see
        :func:`guardrail.calibration.compute_dataset_shift`); with ``activate`` the result
        becomes this model's dataset-level shift."""
        shift = calibration.compute_dataset_shift(
            self.backend,
            self.config.corruption,
            samples,
            batch_size=batch_size,
            anchor_name=anchor_name,
            decode_tokens=decode_tokens,
            progress=progress,
        )
        if activate:
            self.set_dataset_shift(shift)
        return shift

    def compute_sample_shift(
        self, prompt: str | Sequence[dict[str, Any]], images: Sequence[ImageInput] = ()
    ) -> ShiftVector:
        """``Δ`` at the last prompt token of this very input. Generation does not need this:
        sample-level rows measure their shift inside the generation pass, at every token."""
        rendering = render_request(GuardRequest(prompt, images))
        return calibration.compute_sample_shift(self.backend, self.config.corruption, rendering)

    def anchor_stats(self) -> AnchorStats | None:
        """Anchor statistics of the dataset-level shift in use (for the trust policy)."""
        return AnchorStats.of(self.dataset_shift)

    def text_state(self, request: GuardRequest) -> torch.Tensor:
        """Final-layer text-only state of the request's last prompt token (one prefill)."""
        rendering = text_only(render_request(request))
        return calibration.capture_states(self.backend, [rendering])[-1, 0, 0]

    # ----------------------------------------------------------------- generation

    def encode(self, renderings: Sequence[Rendering]) -> Inputs:
        """The backend's model inputs for ``renderings`` (left-padded)."""
        return self._measuring().encode(renderings)

    def prepare(
        self,
        request: GuardRequest,
        sampling: Sampling | None = None,
        *,
        request_id: str | None = None,
        started: float | None = None,
    ) -> PreparedCall:
        """Render and plan ``request`` and turn the plan into the backend's request (reference
        renderings for sample level). Bad input and fail-closed plans raise typed errors with
        their decision record (logged)."""
        started = time.perf_counter() if started is None else started
        sampling = sampling or Sampling()
        vocabulary = len(self.tokenizer)
        outside = [token for token, _ in sampling.logit_bias if token >= vocabulary]
        if outside:
            error = InvalidInputError(
                f"logit_bias names token ids outside the vocabulary of {vocabulary}: {outside[:5]}"
            )
            self.record_refusal(error, request.app)
            raise error
        rendering, plan = self.plan(request)
        backend_request = to_backend_request(
            request_id or uuid.uuid4().hex,
            request,
            rendering,
            plan,
            self.config,
            sampling,
            self.backend.default_image_size,
        )
        prepared_ms = (time.perf_counter() - started) * 1e3
        return PreparedCall(request, plan, backend_request, prepared_ms)

    def conclude(
        self,
        call: PreparedCall,
        answer: Answer,
        batch_rows: int = 1,
        text: str | None = None,
        alternatives: Sequence[tuple[Answer, str | None]] = (),
    ) -> GuardedOutput:
        """The output of a finished call (``text`` when a stop string cut it; ``alternatives``:
        the answers of its other choices, each with its cut text), with its one decision record
        (logged)."""
        outcome = Outcome(
            batch_rows,
            call.prepared_ms,
            answer.live_shift_norm,
            answer.batch,
            tuple(answer.notes),
        )
        decision = decision_record(
            call.plan,
            call.request,
            self.config,
            model_id=self.fingerprint.id,
            outcome=outcome,
            call_id=call.backend_request.id,
        )
        log_decision(decision)
        tools, fmt = call.request.tools, self.backend.tool_format
        logprobs = call.backend_request.sampling.logprobs is not None
        outputs = [
            output_of(a, decision, self.tokenizer, tools, t, fmt, logprobs)
            for a, t in [(answer, text), *alternatives]
        ]
        return with_alternatives(outputs[0], outputs[1:]) if alternatives else outputs[0]

    def planned(self, call: PreparedCall) -> GuardDecision:
        """``call``'s decision as planned, before generation (not logged: :meth:`conclude`
        logs the record, with what generation did)."""
        return decision_record(
            call.plan,
            call.request,
            self.config,
            model_id=self.fingerprint.id,
            call_id=call.backend_request.id,
        )

    def generate(
        self,
        prompt: str | Sequence[dict[str, Any]],
        images: Sequence[ImageInput] = (),
        *,
        alpha: float | None = None,
        mode: Mode | None = None,
        shift: ShiftVector | None = None,
        **generation: Any,
    ) -> GuardedOutput:
        """Generate one guarded answer (``generation``: see :meth:`generate_batch`)."""
        request = GuardRequest(prompt, images, alpha=alpha, mode=mode, shift=shift)
        return self.generate_batch([request], **generation)[0]

    def generate_batch(
        self, requests: Sequence[GuardRequest], **generation: Any
    ) -> list[GuardedOutput]:
        """Generate for several requests in one batch, each with its own correction.
        ``generation``: ``max_new_tokens`` (128), ``temperature`` (0: greedy), ``top_p``,
        ``top_k``, ``seed``, ``min_new_tokens``, or a whole ``sampling``. A request refused by the
        guard raises its typed error before anything is generated."""
        outcomes = self._run([self.prepare(r, sampling_of(generation)) for r in requests])
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def generate_each(
        self, requests: Sequence[GuardRequest], **generation: Any
    ) -> list[GuardedOutput | GuardrailError]:
        """Like :meth:`generate_batch`, but a refused request does not stop the others: its
        place holds the typed error (with its one decision record) instead of an output."""
        sampling = sampling_of(generation)
        refused: dict[int, GuardrailError] = {}
        prepared: dict[int, PreparedCall] = {}
        for i, request in enumerate(requests):
            try:
                prepared[i] = self.prepare(request, sampling)
            except GuardrailError as e:
                refused[i] = e
        answered = dict(zip(prepared, self._run(list(prepared.values())), strict=True))
        results: list[GuardedOutput | GuardrailError] = []
        for i in range(len(requests)):
            outcome = answered[i] if i in answered else refused[i]
            if isinstance(outcome, BaseException) and not isinstance(outcome, GuardrailError):
                raise outcome
            results.append(outcome)
        return results

    def _run(self, calls: Sequence[PreparedCall]) -> list[GuardedOutput | BaseException]:
        answers = run_to_completion(self.backend.open_batch(), [c.backend_request for c in calls])
        results: list[GuardedOutput | BaseException] = []
        for call in calls:
            answer = answers[call.backend_request.id]
            output = self.conclude(call, answer, len(calls))
            results.append(answer.error if answer.error is not None else output)
        return results

    def next_token_logits(
        self, requests: Sequence[GuardRequest]
    ) -> tuple[torch.Tensor, list[GuardDecision]]:
        """Guarded logits at the first generated position (``[batch, vocab]`` float32)."""
        calls = [self.prepare(r) for r in requests]
        logits, norms = self._measuring().first_logits([c.backend_request for c in calls])
        decisions = [
            self.conclude(
                c, Answer(live_shift_norm=norms.get(c.backend_request.id)), len(calls)
            ).decision
            for c in calls
        ]
        return logits, decisions

    def final_states(self, requests: Sequence[GuardRequest]) -> torch.Tensor:
        """Last decoder layer's output at the last prompt token, after any correction:
        ``[batch, hidden]`` float32 (the representation the paper's plots show)."""
        calls = [self.prepare(r) for r in requests]
        last = self.backend.num_layers - 1
        capture = CapturePlan([last])
        self._measuring().first_logits([c.backend_request for c in calls], capture)
        return capture.state(last)[: len(calls), 0].cpu()

    def _measuring(self) -> MeasuringBackend:
        """The backend, when it runs forward passes with any layer plan (evaluation)."""
        if not hasattr(self.backend, "first_logits"):
            raise GuardrailError(
                f"{type(self.backend).__name__} reports states but runs no layer plans: "
                "evaluate on the transformers backend"
            )
        return cast(MeasuringBackend, self.backend)

    def record_refusal(self, error: GuardrailError, app: str | None = None) -> None:
        """Log a ``refused`` decision for a request rejected as bad input, and attach it to
        ``error`` (so that the caller gets the typed error and the record)."""
        error.decision = refusal_record(error, self.config, self.layers, self.fingerprint.id, app)
        log_decision(error.decision)

    def check_limits(self, rendering: Rendering, request: GuardRequest) -> None:
        """Raise a typed error when an image of ``rendering`` would grow past the config's
        budget in the processor's resize, or it nests deeper or runs longer than allowed (the
        model's context by default)."""
        for image in rendering.images:
            resized = self.backend.resized_pixels(*image.size)
            if resized > self.config.max_resized_pixels:
                raise InvalidImageError(
                    f"image of {image.width}x{image.height} would be resized to {resized:,} "
                    f"pixels by the model's processor (at most {self.config.max_resized_pixels:,})"
                )
        depth = self.config.max_json_depth
        check_depth(rendering.messages, depth, "the conversation")
        check_depth(list(rendering.tools), depth, "the tool definitions")
        constraint = request.constraint
        for form in constraint.forms if constraint is not None else ():
            if form.schema is not None:
                check_depth(parse_json(form.schema, "the response schema"), depth, "the schema")
        limit = self.config.max_prompt_tokens or self.backend.context_length or 32768
        check_prompt_tokens(rendering.messages, rendering.tools, self.tokenizer, limit)

    def plan(self, request: GuardRequest) -> tuple[Rendering, RowPlan]:
        """Render and plan one request; bad input and fail-closed plans raise typed errors
        with their decision record (logged)."""
        try:
            check_images(len(request.images), self.config.max_images)
            rendering = render_request(
                request, self.config.max_image_pixels, self.config.max_image_aspect_ratio
            )
            self.check_limits(rendering, request)
            reject_placeholders(rendering, self.backend.placeholders)
            if request.shift is not None:
                self.check_shift(request.shift)
        except GuardrailError as e:
            self.record_refusal(e, request.app)
            raise
        plan = plan_row(
            request,
            self.config,
            self.dataset_lookup,
            multimodal=rendering.multimodal,
            layers=self.layers,
            shift_key=self.shifts.key_name,
        )
        if plan.fail_closed:
            decision = decision_record(plan, request, self.config, model_id=self.fingerprint.id)
            log_decision(decision)
            raise GuardUnavailableError(decision.reason, decision)
        return rendering, plan


@dataclass(frozen=True)
class PreparedCall:
    """A planned request, ready for a batch session: the request, its plan, the backend's form
    of it, and how long preparing it took (ms)."""

    request: GuardRequest
    plan: RowPlan
    backend_request: BackendRequest
    prepared_ms: float


_SAMPLING_ARGUMENTS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "min_new_tokens",
        "do_sample",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "logprobs",
    }
)


def sampling_of(generation: dict[str, Any]) -> Sampling:
    """:class:`Sampling` from ``generate``-style keyword arguments (or ``sampling=``)."""
    if "sampling" in generation:
        given: Sampling = generation["sampling"]
        return given
    unknown = set(generation) - _SAMPLING_ARGUMENTS
    if unknown:
        raise TypeError(f"unsupported generation argument(s) {sorted(unknown)}")
    settings = {k: v for k, v in generation.items() if k != "do_sample"}
    if isinstance(settings.get("logit_bias"), dict):  # {token id: bias}, as OpenAI spells it
        settings["logit_bias"] = tuple(
            (int(k), float(v)) for k, v in settings["logit_bias"].items()
        )
    if not generation.get("do_sample", "temperature" in settings):
        settings["temperature"] = 0.0
    return Sampling(**settings)
