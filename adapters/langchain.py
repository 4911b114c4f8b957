"""ChatGuardedVLM: a LangChain chat model over a local VLM, with CMRM on every multimodal call.

Drop it in wherever a chat model goes: ``invoke``, ``stream``, ``batch`` and their async forms
work as usual. Text-only conversations pass straight through. Every call's safety decision is
returned in ``response_metadata["safety"]``, logged on ``guardrail.decisions`` and sent to
LangChain callbacks as the custom event ``guardrail_decision``. No tool calling.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from langchain_core.caches import BaseCache
from langchain_core.callbacks import (
    CallbackManager,
    CallbackManagerForLLMRun,
    dispatch_custom_event,
)
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from adapters.caching import GuardedCache, cache_key_params
from adapters.coalescing import RequestCoalescer
from adapters.messages import to_conversation
from adapters.remote_images import RemoteImageFetcher
from guardrail import GuardConfig, GuardedOutput, GuardedVLM, GuardRequest
from guardrail.anchors import BUNDLED_ANCHORS
from guardrail.config import Mode
from guardrail.errors import GuardrailError, InvalidInputError
from guardrail.registry import shared_model
from guardrail.trust import POLICIES, TrustInput, TrustPolicy
from shift_store import open_store

Trust = Literal["trusted", "untrusted"]


# Keyword arguments a call may pass (LangChain's own tracing arguments included).
_CALL_ARGUMENTS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "trust",
        "model",
        "ls_structured_output_format",
    }
)
_SEEDED = threading.Lock()


class _StopWhen(StoppingCriteria):
    """Ends generation for every row once ``event`` is set (a stream's consumer went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class ChatGuardedVLM(BaseChatModel):
    """A local vision-language model behind CMRM, as a LangChain chat model.

    ``model`` is a hub name or local folder; several instances with different ``app`` and
    ``alpha`` share one loaded model. ``family`` names its model family when the checkpoint's
    ``model_type`` does not (see ``guardrail.families``). ``store`` is a shift store URL
    (None: the embedded folder store); the store namespace is ``app``. The dataset-level
    shift is looked up under ``anchor_name`` and, on a miss, computed from ``anchors``
    (default: the bundled set). ``trust_policy`` is one of ``image-source`` (the default:
    images the application passes inline are trusted, remote URLs are not, since whoever
    controls the URL controls the image), ``always-trusted``, ``always-untrusted``,
    ``anchor-distance`` or your own :class:`~guardrail.trust.TrustPolicy`;
    ``invoke(..., trust="untrusted")`` overrides it. Untrusted calls get a sample-level shift.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str
    app: str = "default"
    alpha: float = Field(default=1.0, ge=0.0)
    mode: Mode = "auto"
    layers: tuple[int, ...] | None = None
    on_unavailable: Literal["fail_closed", "unguarded"] = "fail_closed"
    store: str | None = None
    anchor_name: str = BUNDLED_ANCHORS
    anchors: list[str] | None = None
    trust_policy: str | TrustPolicy = "image-source"
    max_tokens: int = 256
    stop: list[str] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    device: str | None = None
    dtype: str | None = None
    family: str | None = None
    allow_image_hosts: list[str] | None = None
    allow_image_networks: list[str] = Field(default_factory=list)
    max_image_bytes: int = 10_000_000
    image_timeout_s: float = 5.0
    batch_window_ms: float = 5.0

    _vlm: GuardedVLM = PrivateAttr()
    _policy: TrustPolicy = PrivateAttr()
    _fetcher: RemoteImageFetcher = PrivateAttr()
    _coalescer: RequestCoalescer = PrivateAttr()

    def model_post_init(self, _context: Any) -> None:
        base = shared_model(self.model, self.device, self.dtype, self.family)
        config = GuardConfig(
            alpha=self.alpha, mode=self.mode, layers=self.layers, on_unavailable=self.on_unavailable
        )
        self._vlm = base.with_config(config)
        store = open_store(self.store, namespace=self.app)  # the URL may name its own namespace
        self._vlm.use_store(store, anchor_name=self.anchor_name, anchors=self.anchors)
        policy = self.trust_policy
        self._policy = POLICIES[policy]() if isinstance(policy, str) else policy
        self._fetcher = RemoteImageFetcher(
            allow_hosts=self.allow_image_hosts,
            allow_networks=self.allow_image_networks,
            max_bytes=self.max_image_bytes,
            timeout_s=self.image_timeout_s,
        )
        self._coalescer = RequestCoalescer(self._run_batch, self.batch_window_ms / 1000)
        if self.cache is not False and not isinstance(self.cache, GuardedCache):
            inner = self.cache if isinstance(self.cache, BaseCache) else None
            self.cache = GuardedCache(inner, get_llm_cache)

    @property
    def _llm_type(self) -> str:
        return "cmrm-guarded-vlm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes an answer or its guarding (the LLM cache key)."""
        own = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in BaseChatModel.model_fields
        }
        guard = {
            "config": self._vlm.config.model_dump(mode="json"),
            "model": self._vlm.fingerprint.id,
            "shift_key": self._vlm.shifts.key_name,
        }
        return cache_key_params(own, guard)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(
            ls_provider="cmrm-guardrail",
            ls_model_name=kwargs.get("model", self.model),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's own tokenizer (never a downloaded one)."""
        ids: list[int] = self._vlm.tokenizer.encode(text, add_special_tokens=False)
        return ids

    @property
    def guarded_model(self) -> GuardedVLM:
        """The engine view this chat model runs on."""
        return self._vlm

    # ----------------------------------------------------------------- requests

    def _request(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> GuardRequest:
        try:
            return self._classified_request(messages, kwargs)
        except GuardrailError as e:
            self._vlm.record_refusal(e, self.app)
            raise

    def _classified_request(
        self, messages: list[BaseMessage], kwargs: dict[str, Any]
    ) -> GuardRequest:
        started = time.perf_counter()
        unknown = sorted(set(kwargs) - _CALL_ARGUMENTS)
        if unknown:
            raise InvalidInputError(
                f"unsupported argument(s) {', '.join(unknown)}; this chat model takes "
                f"{', '.join(sorted(_CALL_ARGUMENTS))}"
            )
        if kwargs.get("model", self.model) != self.model:
            raise InvalidInputError(
                f"per-call model override is not supported: this chat model runs {self.model}"
            )
        trust: Trust | None = kwargs.get("trust")
        conversation = to_conversation(messages, self._fetcher)
        request = GuardRequest(conversation.messages, conversation.images, app=self.app)
        if not conversation.images:
            return request
        if trust is not None:
            trusted, reason = trust == "trusted", f"caller override: {trust}"
        else:
            verdict = self._policy.classify(
                TrustInput(tuple(conversation.sources), lambda: self._vlm.text_state(request)),
                self._vlm.anchor_stats(),
            )
            trusted, reason = verdict.trusted, verdict.reason
        reason += f" (checked in {(time.perf_counter() - started) * 1e3:.1f} ms)"
        return GuardRequest(
            conversation.messages,
            conversation.images,
            app=self.app,
            trusted=trusted,
            trust_reason=reason,
        )

    def _settings(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        temperature = kwargs.get("temperature", self.temperature)
        settings: dict[str, Any] = {
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            settings.update(temperature=temperature, top_p=kwargs.get("top_p", self.top_p))
            if kwargs.get("top_k") is not None:
                settings["top_k"] = int(kwargs["top_k"])
            if kwargs.get("seed") is not None:
                settings["seed"] = int(kwargs["seed"])
        if stop:
            settings["stop_strings"] = list(stop)
        return settings

    def _run_batch(
        self, requests: list[GuardRequest], settings: dict[str, Any]
    ) -> list[GuardedOutput | GuardrailError]:
        extra = {"tokenizer": self._vlm.tokenizer} if "stop_strings" in settings else {}
        settings = dict(settings)
        seed = settings.pop("seed", None)
        if seed is None:
            return self._vlm.generate_each(requests, **settings, **extra)
        with _SEEDED:  # sampling draws from torch's global generator: one seeded call at a time
            torch.manual_seed(seed)
            return self._vlm.generate_each(requests, **settings, **extra)

    def _message(
        self, text: str, output: GuardedOutput, cls: type = AIMessage, stopped: bool = False
    ) -> BaseMessage:
        usage = UsageMetadata(
            input_tokens=output.usage.prompt_tokens,
            output_tokens=output.usage.completion_tokens,
            total_tokens=output.usage.total_tokens,
        )
        return cls(
            content=text,
            usage_metadata=usage,
            response_metadata={
                "model_name": self.model,
                "model_provider": "cmrm-guardrail",
                "finish_reason": "stop" if stopped else output.finish_reason,
                "safety": output.decision.model_dump(mode="json"),
            },
        )

    @staticmethod
    def _cut_at_stop(text: str, stop: list[str] | None) -> str:
        cuts = [text.index(s) for s in stop or [] if s in text]
        return text[: min(cuts)] if cuts else text

    def _report(self, output: GuardedOutput, run_manager: CallbackManagerForLLMRun | None) -> None:
        """Send the decision to callbacks as the custom event ``guardrail_decision``."""
        if run_manager is None:  # streaming paths: the run's callbacks come from the context
            with contextlib.suppress(RuntimeError):  # called outside any run: nobody listens
                dispatch_custom_event("guardrail_decision", output.decision.model_dump(mode="json"))
            return
        dispatcher = CallbackManager(
            run_manager.handlers,
            run_manager.inheritable_handlers,
            parent_run_id=run_manager.parent_run_id,
            tags=run_manager.tags,
            metadata=run_manager.metadata,
        )
        dispatcher.on_custom_event(
            "guardrail_decision", output.decision.model_dump(mode="json"), run_id=run_manager.run_id
        )

    # ----------------------------------------------------------------- LangChain API

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        stop = stop or self.stop
        request = self._request(messages, kwargs)
        output = self._coalescer.submit(request, self._settings(stop, kwargs))
        self._report(output, run_manager)
        text = self._cut_at_stop(output.text, stop)
        message = self._message(text, output, stopped=text != output.text)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stop = stop or self.stop
        request = self._request(messages, kwargs)
        streamer = TextIteratorStreamer(
            self._vlm.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        result: dict[str, Any] = {}
        consumer_gone = threading.Event()

        def work() -> None:
            try:
                settings = {
                    **self._settings(stop, kwargs),
                    "streamer": streamer,
                    "stopping_criteria": StoppingCriteriaList([_StopWhen(consumer_gone)]),
                }
                outcome = self._run_batch([request], settings)[0]
                if isinstance(outcome, GuardrailError):
                    raise outcome
                result["output"] = outcome
            except BaseException as e:
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        held, stopped = "", False
        keep = max((len(s) for s in stop or []), default=1) - 1
        try:
            for piece in streamer:
                held += piece
                safe = self._cut_at_stop(held, stop)
                if safe != held:  # a stop sequence appeared: emit up to it, then stop
                    held, stopped = safe, True
                    break
                if len(held) > keep:
                    out, held = held[: len(held) - keep], held[len(held) - keep :]
                    if run_manager is not None:
                        run_manager.on_llm_new_token(out)
                    yield ChatGenerationChunk(message=AIMessageChunk(content=out))
        finally:  # the consumer stopped, or the answer is complete: generation ends either way
            consumer_gone.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        output: GuardedOutput = result["output"]
        self._report(output, run_manager)
        final = self._cut_at_stop(held, stop)
        stopped = stopped or final != held
        yield ChatGenerationChunk(message=self._message(final, output, AIMessageChunk, stopped))
