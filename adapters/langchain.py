"""ChatGuardedVLM: a LangChain chat model over a local VLM, with CMRM on every multimodal call.

Drop it in wherever a chat model goes: ``invoke``, ``stream``, ``batch`` and their async forms
work as usual. Text-only conversations pass straight through. Every call's safety decision is
returned in ``response_metadata["safety"]``, logged on ``guardrail.decisions`` and sent to
LangChain callbacks as the custom event ``guardrail_decision``.

Tools bind as with any chat model (``bind_tools``, ``tool_choice``); ``tool_choice="any"`` or
a named tool, ``with_structured_output`` and ``response_format`` are held to their JSON
schema by constrained decoding. Images in tool results are guarded like any other, and trust
policies see their source as ``tool``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

import torch
from langchain_core.caches import BaseCache
from langchain_core.callbacks import (
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableMap,
    RunnablePassthrough,
    ensure_config,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from adapters.caching import GuardedCache, cache_key_params
from adapters.coalescing import RequestCoalescer
from adapters.messages import to_conversation
from adapters.remote_images import RemoteImageFetcher
from guardrail import GuardConfig, GuardedOutput, GuardedVLM, GuardRequest
from guardrail.anchors import BUNDLED_ANCHORS
from guardrail.config import Mode
from guardrail.constraints import OutputConstraint
from guardrail.errors import GuardrailError, InvalidInputError
from guardrail.registry import shared_model
from guardrail.tools import TOOL_CALL_OPEN, Tool, tool_name
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
        "max_time",
        "trust",
        "model",
        "tools",
        "tool_choice",
        "response_format",
        "strict",  # schemas are always held strictly (constrained decoding)
        "parallel_tool_calls",
        "ls_structured_output_format",
    }
)
StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]
_SEEDED = threading.Lock()


class _StopWhen(StoppingCriteria):
    """Ends generation for every row once ``event`` is set (a stream's consumer went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


def _tool_choice_value(choice: Any, tools: Sequence[Tool]) -> str:
    """LangChain's and OpenAI's spellings of ``tool_choice`` as ``auto``, ``none``,
    ``required`` or a tool's name."""
    if choice is None or choice == "auto":
        return "auto"
    if choice is False or choice == "none":
        return "none"
    if choice is True or choice in ("any", "required"):
        return "required"
    name = choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
    names = [tool_name(tool) for tool in tools]
    if not isinstance(name, str) or name not in names:
        raise InvalidInputError(f"tool_choice {choice!r} names none of the tools {names}")
    return name


def _constraint(
    tools: Sequence[Tool], choice: str, response_format: Any
) -> OutputConstraint | None:
    """What constrained decoding must hold the answer to, if anything: a tool call when one is
    required; the response format, or a tool call when tools are offered too."""
    answer = None if response_format is None else _response_constraint(response_format)
    if not tools or choice == "none":
        return answer
    if choice == "auto":
        return None if answer is None else answer.or_else(OutputConstraint.tool_call(tools))
    return OutputConstraint.tool_call(tools, None if choice == "required" else choice)


def _response_constraint(response_format: Any) -> OutputConstraint:
    if isinstance(response_format, type) and is_basemodel_subclass(response_format):
        schema: dict[str, Any] = response_format.model_json_schema()  # type: ignore[attr-defined]
        return OutputConstraint.json_schema(schema)
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return OutputConstraint.any_json()
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return OutputConstraint.json_schema(response_format["json_schema"]["schema"])
    raise InvalidInputError(
        "response_format must be {'type': 'json_object'}, {'type': 'json_schema', "
        f"'json_schema': {{'schema': ...}}}} or a pydantic class, not {response_format!r}"
    )


class ChatGuardedVLM(BaseChatModel):
    """A local vision-language model behind CMRM, as a LangChain chat model.

    ``model`` is a hub name or local folder; several instances with different ``app`` and
    ``alpha`` share one loaded model. ``family`` names its model family when the checkpoint's
    ``model_type`` does not (see ``guardrail.families``). ``store`` is a shift store URL
    (None: the embedded folder store); the store namespace is ``namespace`` (default: ``app``).
    The dataset-level shift is looked up under ``anchor_name`` and, on a miss, computed from
    ``anchors`` (default: the bundled set). ``trust_policy`` is one of ``image-source`` (the
    default: images the application passes inline are trusted, remote URLs are not, since
    whoever controls the URL controls the image), ``always-trusted``, ``always-untrusted``,
    ``anchor-distance`` or your own :class:`~guardrail.trust.TrustPolicy`;
    ``invoke(..., trust="untrusted")`` overrides it. Untrusted calls get a sample-level shift,
    and so do calls that offer tools unless ``sample_level_with_tools`` is False (see
    :class:`~guardrail.GuardConfig`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str
    app: str = "default"
    alpha: float = Field(default=1.0, ge=0.0)
    mode: Mode = "auto"
    layers: tuple[int, ...] | None = None
    on_unavailable: Literal["fail_closed", "unguarded"] = "fail_closed"
    sample_level_with_tools: bool = True
    store: str | None = None
    namespace: str | None = None
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
            alpha=self.alpha,
            mode=self.mode,
            layers=self.layers,
            on_unavailable=self.on_unavailable,
            sample_level_with_tools=self.sample_level_with_tools,
        )
        self._vlm = base.with_config(config)
        # the URL may name its own namespace
        store = open_store(self.store, namespace=self.namespace or self.app)
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
        params["ls_provider"] = "cmrm-guardrail"
        params["ls_model_name"] = kwargs.get("model", self.model)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's own tokenizer (never a downloaded one)."""
        ids: list[int] = self._vlm.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            text_inputs=True,
            image_inputs=True,
            image_url_inputs=True,
            image_tool_message=True,
            text_outputs=True,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
        )

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model. ``tool_choice``: ``"auto"`` (default), ``"none"``,
        ``"any"``/``"required"``/``True`` (some tool must be called) or a tool's name; the last
        two are enforced by constrained decoding."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = _tool_choice_value(tool_choice, formatted)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(  # type: ignore[override,unused-ignore]
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict, JSON schema or OpenAI
        tool). ``json_schema`` (default) holds the answer to the schema by constrained
        decoding; ``function_calling`` forces a call to a tool named after the schema;
        ``json_mode`` holds it to any JSON object."""
        if method == "function_calling":
            return super().with_structured_output(schema or {}, include_raw=include_raw, **kwargs)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            if pydantic
            else JsonOutputParser()
        )
        if method == "json_mode":
            response_format: dict[str, Any] = {"type": "json_object"}
        elif schema is None:
            raise ValueError("method='json_schema' needs a schema")
        else:
            json_schema = convert_to_json_schema(schema)  # pydantic (v1 or v2), TypedDict...
            response_format = {"type": "json_schema", "json_schema": {"schema": json_schema}}
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks(
            [unparsed], exception_key="parsing_error"
        )

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
        tools = [convert_to_openai_tool(t) for t in kwargs.get("tools") or []]
        choice = _tool_choice_value(kwargs.get("tool_choice"), tools)
        offered: dict[str, Any] = {
            "tools": () if choice == "none" else tools,
            "constraint": _constraint(tools, choice, kwargs.get("response_format")),
        }
        conversation = to_conversation(messages, self._fetcher)
        request = GuardRequest(conversation.messages, conversation.images, app=self.app, **offered)
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
            **offered,
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
        if kwargs.get("max_time") is not None:  # seconds; the answer ends as if at max_tokens
            settings["max_time"] = float(kwargs["max_time"])
        return settings

    def _run_batch(
        self, requests: list[GuardRequest], settings: dict[str, Any]
    ) -> list[GuardedOutput | GuardrailError]:
        extra: dict[str, Any] = {}
        if "stop_strings" in settings:
            extra["tokenizer"] = self._vlm.tokenizer
        settings = dict(settings)
        seed = settings.pop("seed", None)
        if seed is None:
            return self._vlm.generate_each(requests, **settings, **extra)
        with _SEEDED:  # sampling draws from torch's global generator: one seeded call at a time
            torch.manual_seed(seed)
            return self._vlm.generate_each(requests, **settings, **extra)

    def _message(
        self, content: str, output: GuardedOutput, cls: type = AIMessage, stopped: bool = False
    ) -> BaseMessage:
        usage = UsageMetadata(
            input_tokens=output.usage.prompt_tokens,
            output_tokens=output.usage.completion_tokens,
            total_tokens=output.usage.total_tokens,
        )
        calls: dict[str, Any]
        if cls is AIMessageChunk:  # a stream's last chunk: the calls, each as one whole chunk
            written: list[tuple[str | None, str, str]] = [
                (c.name, json.dumps(c.arguments), c.id) for c in output.tool_calls
            ]
            written += [(c.name, c.text, c.id) for c in output.invalid_tool_calls]
            chunks = [
                tool_call_chunk(name=name, args=args, id=id_, index=i)
                for i, (name, args, id_) in enumerate(written)
            ]
            calls = {"tool_call_chunks": chunks}
        else:
            calls = {
                "tool_calls": [
                    tool_call(name=c.name, args=c.arguments, id=c.id) for c in output.tool_calls
                ],
                "invalid_tool_calls": [
                    invalid_tool_call(name=c.name, args=c.text, id=c.id, error=c.error)
                    for c in output.invalid_tool_calls
                ],
            }
        message: BaseMessage = cls(
            content=content,
            usage_metadata=usage,
            response_metadata={
                "model_name": self.model,
                "model_provider": "cmrm-guardrail",
                "finish_reason": "stop" if stopped else output.finish_reason,
                "safety": output.decision.model_dump(mode="json"),
            },
            **calls,
        )
        return message

    @staticmethod
    def _cut_at_stop(text: str, stop: list[str] | None) -> str:
        cuts = [text.index(s) for s in stop or [] if s in text]
        return text[: min(cuts)] if cuts else text

    def _report(self, output: GuardedOutput, run_manager: CallbackManagerForLLMRun | None) -> None:
        """Send the decision to the run's callbacks as the custom event ``guardrail_decision``
        (``stream``/``astream`` run ``_stream`` without a run manager: they report it there)."""
        if run_manager is None:
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

    def _announce(self, chunk: AIMessageChunk, config: RunnableConfig | None) -> None:
        """From ``stream``/``astream``: the decision on the last chunk to the stream's run (its
        id is in the chunk's message id), like :meth:`_report` does for other paths."""
        safety = chunk.response_metadata.get("safety")
        if not safety:
            return
        config = ensure_config(config)
        manager = CallbackManager.configure(
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            config.get("metadata"),
            self.metadata,
        )
        run_id = (chunk.id or "").removeprefix(f"{LC_ID_PREFIX}-")
        manager.on_custom_event(
            "guardrail_decision", safety, run_id=uuid.UUID(run_id) if run_id else uuid.uuid4()
        )

    # ----------------------------------------------------------------- LangChain API

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        streams = self._should_stream(async_api=False, **{**kwargs, "stream": True})
        for chunk in super().stream(input, config, stop=stop, **kwargs):
            if streams:  # otherwise it ran invoke, which reported the decision itself
                self._announce(chunk, config)
            yield chunk

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        streams = self._should_stream(async_api=True, **{**kwargs, "stream": True})
        async for chunk in super().astream(input, config, stop=stop, **kwargs):
            if streams:
                self._announce(chunk, config)
            yield chunk

    def generate_many(
        self,
        conversations: Sequence[Sequence[BaseMessage]],
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> list[AIMessage | GuardrailError]:
        """Answer several conversations with the same call settings in one batched pass, for
        front ends that batch requests themselves (Ray Serve). A refused conversation's place
        holds its typed error (with its decision). No LangChain callbacks run."""
        stop = stop or self.stop
        answers: dict[int, AIMessage | GuardrailError] = {}
        requests: dict[int, GuardRequest] = {}
        for i, messages in enumerate(conversations):
            try:
                requests[i] = self._request(list(messages), kwargs)
            except GuardrailError as e:
                answers[i] = e
        outcomes = self._run_batch(list(requests.values()), self._settings(stop, kwargs))
        for i, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, GuardrailError):
                answers[i] = outcome
                continue
            text = self._cut_at_stop(outcome.answer, stop)
            message = self._message(text, outcome, stopped=text != outcome.answer)
            assert isinstance(message, AIMessage)
            answers[i] = message
        return [answers[i] for i in range(len(conversations))]

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
        text = self._cut_at_stop(output.answer, stop)
        message = self._message(text, output, stopped=text != output.answer)
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
        markers = [*(stop or []), *([TOOL_CALL_OPEN] if request.tools else [])]
        keep = max((len(s) for s in markers), default=1) - 1
        try:
            for piece in streamer:
                held += piece
                safe = self._cut_at_stop(held, stop)
                if safe != held:  # a stop sequence appeared: emit up to it, then stop
                    held, stopped = safe, True
                    break
                if request.tools and TOOL_CALL_OPEN in held:
                    continue  # tool calls: sent whole in the last chunk, once parsed
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
        text = held.split(TOOL_CALL_OPEN)[0] if request.tools else held  # calls go in chunks
        final = self._cut_at_stop(text, stop)
        stopped = stopped or final != text
        last = self._message(final, output, AIMessageChunk, stopped)
        assert isinstance(last, AIMessageChunk)
        yield ChatGenerationChunk(message=last)
