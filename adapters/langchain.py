"""ChatGuardedVLM: a LangChain chat model over a local VLM, with CMRM on every multimodal call.

Drop it in wherever a chat model goes: ``invoke``, ``stream``, ``batch`` and their async forms
work as usual. It only translates: messages to a guard :class:`~guardrail.service.Call`, the
service's output to an ``AIMessage``, the decision to callbacks. Scheduling, trust, streaming,
stop strings and records are the :class:`~guardrail.service.GuardService`'s. Every call's
decision is in ``response_metadata["safety"]``, logged on ``guardrail.decisions`` and sent to
callbacks as the custom event ``guardrail_decision``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Self

from langchain_core.caches import BaseCache
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.load.serializable import (
    SerializedConstructor,
    SerializedNotImplemented,
    to_json_not_implemented,
)
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from adapters.caching import GuardedCache, cache_key_params
from adapters.conversation import answer_constraint, tool_choice_value
from adapters.langchain_errors import langchain_errors
from adapters.langchain_events import DecisionEvents
from adapters.langchain_tools import ToolBinding
from adapters.messages import to_conversation, to_message
from adapters.remote_images import RemoteImageFetcher
from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.anchors import BUNDLED_ANCHORS
from guardrail.backends import Sampling
from guardrail.backends.runtimes import Runtime
from guardrail.config import fold_guard_fields
from guardrail.errors import GuardrailError, InvalidInputError
from guardrail.registry import shared_service
from guardrail.service import AppSpec, Call, GuardService
from guardrail.trust import TrustPolicy
from shift_store import Lookup

# Keyword arguments a call may pass (LangChain's own tracing arguments included).
_CALL_ARGUMENTS = frozenset(
    {
        *("max_tokens", "temperature", "top_p", "top_k", "seed", "max_time", "trust", "model"),
        *("tools", "tool_choice", "response_format", "parallel_tool_calls"),
        "strict",  # schemas are always held strictly (constrained decoding)
        "ls_structured_output_format",
    }
)


class ChatGuardedVLM(DecisionEvents, ToolBinding, BaseChatModel):
    """A local vision-language model behind CMRM, as a LangChain chat model.

    ``engine`` is a :class:`GuardService` (or a :class:`GuardedVLM`, served by a new one) to
    run on; without it, ``model`` (a hub name or local folder, with ``device``, ``dtype`` and
    ``family``) is loaded once per process and shared by every app, through transformers or,
    with ``backend="vllm"``, on a vLLM engine (``engine_args`` go to ``vllm.LLM``). ``guard``
    is the app's :class:`GuardConfig`; its fields may also be given flat (``alpha=0.8``).
    ``store`` is a shift store URL (None: the embedded folder store), under ``namespace``
    (default: ``app``). Constructing looks the app's dataset-level shift up; computing it is
    the explicit :meth:`calibrate` (or :meth:`from_model_id`, which loads and calibrates).
    ``trust_policy`` is a name of ``guardrail.trust.POLICIES`` or your own policy;
    ``invoke(..., trust="untrusted")`` overrides it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str = ""
    engine: GuardService | None = Field(default=None, exclude=True)
    app: str = "default"
    guard: GuardConfig = GuardConfig()
    store: str | None = None
    namespace: str | None = None
    anchor_name: str = BUNDLED_ANCHORS
    trust_policy: str | TrustPolicy = "image-source"
    max_tokens: int = 256
    stop: list[str] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    device: str | None = None
    dtype: str | None = None
    family: str | None = None
    backend: Runtime = "transformers"
    engine_args: dict[str, Any] = Field(default_factory=dict)
    allow_image_hosts: list[str] | None = None
    allow_image_networks: list[str] = Field(default_factory=list)
    max_image_bytes: int = 10_000_000
    image_timeout_s: float = 5.0

    _service: GuardService = PrivateAttr()
    _vlm: GuardedVLM = PrivateAttr()
    _fetcher: RemoteImageFetcher = PrivateAttr()
    _key: str = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _nested_guard(cls, values: Any) -> Any:
        """Flat ``GuardConfig`` fields (``alpha=0.8``) go into ``guard``; an engine given as a
        :class:`GuardedVLM` gets a service of its own."""
        values = fold_guard_fields(values)
        if isinstance(values, dict) and isinstance(values.get("engine"), GuardedVLM):
            values["engine"] = GuardService(values["engine"])
        return values

    def model_post_init(self, _context: Any) -> None:
        if self.engine is None and not self.model:
            raise InvalidInputError("ChatGuardedVLM needs a model name or path, or an engine")
        self._service = self.engine or shared_service(
            self.model, self.device, self.dtype, self.family, self.backend, self.engine_args
        )
        self.model = self.model or self._service.model.fingerprint.name_or_path
        policy = self.trust_policy if not isinstance(self.trust_policy, str) else None
        spec = AppSpec(
            name=self.app,
            guard=self.guard,
            store=self.store,
            namespace=self.namespace,
            anchor_name=self.anchor_name,
            trust_policy=self.trust_policy if isinstance(self.trust_policy, str) else "custom",
            max_tokens=max(self.max_tokens, 1024),
        )
        # instances with equal settings share one app entry; others get their own
        self._key = f"{self.app}#{hash((spec.model_dump_json(), id(policy)))}"
        self._vlm = self._service.add_app(spec, policy, key=self._key)
        self._fetcher = RemoteImageFetcher(
            allow_hosts=self.allow_image_hosts,
            allow_networks=self.allow_image_networks,
            max_bytes=self.max_image_bytes,
            timeout_s=self.image_timeout_s,
        )
        self.cache = self.cache  # wrapped by __setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        """A cache set at any time is wrapped: it stores only guarded answers, under the guard's
        key, and a replay gets its own decision record."""
        if name == "cache" and value is not False and not isinstance(value, GuardedCache):
            value = GuardedCache(value if isinstance(value, BaseCache) else None, get_llm_cache)
        super().__setattr__(name, value)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy whose changed settings take effect: flat guard fields fold into ``guard``,
        and the copy registers its own app with the service."""
        values = fold_guard_fields({"guard": self.guard, **(update or {})})
        copied = super().model_copy(update=values, deep=deep)
        copied.model_post_init(None)
        return copied

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Serializable with ``langchain_core.load.dumps``: the settings, not the loaded model
        (``loads(..., valid_namespaces=["adapters"], allowed_objects=[ChatGuardedVLM])`` loads
        the model by name again, shared per process)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["adapters", "langchain"]

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        """The constructor's settings as plain values: the guard config as a dict; no engine
        (the model is named instead) and no cache (a reloaded model wraps its own). A custom
        trust policy object cannot be written down: such a model is not serializable."""
        if not isinstance(self.trust_policy, str):
            return to_json_not_implemented(self)
        serialized = super().to_json()
        if serialized["type"] != "constructor":
            return serialized
        kwargs = dict(serialized["kwargs"])
        for unwritable in ("engine", "cache", "callbacks", "callback_manager", "rate_limiter"):
            kwargs.pop(unwritable, None)
        kwargs["model"] = self.model
        kwargs["guard"] = self.guard.model_dump(mode="json")
        return {**serialized, "kwargs": kwargs}

    @classmethod
    def from_model_id(
        cls, model: str, *, calibrate: bool = True, anchors: list[str] | None = None, **fields: Any
    ) -> ChatGuardedVLM:
        """Load ``model`` (shared per process) and, with ``calibrate``, make the app's
        dataset-level shift available (see :meth:`calibrate`)."""
        chat = cls(model=model, **fields)
        if calibrate:
            chat.calibrate(anchors)
        return chat

    def calibrate(self, anchors: list[str] | None = None) -> Lookup:
        """Find the app's dataset-level shift in its store, or compute it from ``anchors``
        (default: the bundled set) and store it."""
        return self._service.calibrate(self._key, anchors)

    @property
    def guarded_model(self) -> GuardedVLM:
        """The engine view this chat model runs on."""
        return self._vlm

    @property
    def service(self) -> GuardService:
        return self._service

    @property
    def _llm_type(self) -> str:
        return "cmrm-guarded-vlm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes an answer or its guarding (the LLM cache key)."""
        own = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in BaseChatModel.model_fields and name != "engine"
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

    # ----------------------------------------------------------------- calls

    def _call(
        self, messages: list[BaseMessage], stop: list[str] | None, kw: dict[str, Any]
    ) -> Call:
        try:
            unknown = sorted(set(kw) - _CALL_ARGUMENTS)
            if unknown:
                raise InvalidInputError(
                    f"unsupported argument(s) {', '.join(unknown)}; this chat model takes "
                    f"{', '.join(sorted(_CALL_ARGUMENTS))}"
                )
            if kw.get("model", self.model) != self.model:
                raise InvalidInputError(f"per-call model override: this runs {self.model}")
            tools = [convert_to_openai_tool(t) for t in kw.get("tools") or []]
            choice = tool_choice_value(kw.get("tool_choice"), tools)
            constraint = answer_constraint(tools, choice, kw.get("response_format"))
            conversation = to_conversation(messages, self._fetcher)
        except GuardrailError as e:
            raise self._service.refuse(self._key, e) from None
        offered = () if choice == "none" else tools
        request = GuardRequest(
            conversation.messages, conversation.images, tools=offered, constraint=constraint
        )
        temperature = kw.get("temperature", self.temperature)
        try:
            sampling = Sampling(
                max_new_tokens=kw.get("max_tokens", self.max_tokens),
                temperature=temperature,
                top_p=kw.get("top_p", self.top_p) if temperature > 0 else 1.0,
                top_k=kw.get("top_k") if temperature > 0 else None,
                seed=kw.get("seed"),
            )
        except GuardrailError as e:
            raise self._service.refuse(self._key, e) from None
        sources = tuple(conversation.sources)
        stops = tuple(stop or self.stop or ())
        return Call(
            self._key, request, sampling, sources, kw.get("trust"), stops, kw.get("max_time")
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with langchain_errors():
            output = self._service.submit(self._call(messages, stop, kwargs)).result()
        self._report(output, run_manager)
        return ChatResult(generations=[ChatGeneration(message=to_message(output, self.model))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        with langchain_errors():
            handle = self._service.submit(self._call(messages, stop, kwargs))
        try:
            for text in handle:
                if run_manager is not None:
                    run_manager.on_llm_new_token(text)
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
        finally:  # the consumer stopped early: generation ends
            if not handle.done:
                handle.cancel()
        with langchain_errors():
            output = handle.result()
        self._report(output, run_manager)
        yield ChatGenerationChunk(message=to_message(output, self.model, chunk=True))
