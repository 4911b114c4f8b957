"""The transformers backend: an ``AutoModelForImageTextToText`` model and its processor."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from guardrail.backends.base import BackendRequest, Inputs, Processor
from guardrail.backends.fingerprint import fingerprint_model
from guardrail.backends.grammar import GrammarCompiler
from guardrail.backends.hooks import CapturePlan, DecoderHooks, LayerPlan, TrimState
from guardrail.backends.processors import load_processor
from guardrail.backends.transformers_batch import TransformersBatch
from guardrail.families import ModelFamily, family_for, family_named
from guardrail.requests import Rendering
from guardrail.tool_formats import ToolCallFormat, tool_format
from guardrail.tools import prompt_messages, takes_tools

logger = logging.getLogger(__name__)


class TransformersBackend:
    """A transformers vision-language model, run with CMRM's hooks on its decoder layers.

    ``family`` is found from the model config unless given (a :class:`ModelFamily`, or the name
    of a known one). The processor's tokenizer is used as it is: padding side is chosen per call.
    """

    def __init__(
        self, model: PreTrainedModel, processor: Processor, family: ModelFamily | str | None = None
    ) -> None:
        self.family = resolve_family(family, getattr(model, "config", None))
        self.layers = self.family.decoder_layers(model)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer: PreTrainedTokenizerBase = (
            processor if isinstance(processor, PreTrainedTokenizerBase) else processor.tokenizer
        )
        self.num_layers = len(self.layers)
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.context_length = context_length(model.config)
        self.image_token_id = self.family.image_token_id(model.config)
        self.image_layers = self.family.image_layers(model.config)
        self.placeholders = placeholders_of(processor, self.tokenizer)
        self.fingerprint = fingerprint_model(model, self.num_layers, self.hidden_size)
        template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        self.takes_tools = takes_tools(template if isinstance(template, str) else None)
        self.tool_format = tool_format(self.family.tool_call_format)
        if self.takes_tools and self.family.tool_call_format is None:
            logger.warning(
                "the %s chat template renders tools itself, but the family names no tool call "
                "format: answers are parsed in the Hermes format",
                self.family.name,
            )
        self._grammars: GrammarCompiler | None = None
        self.hooks = DecoderHooks(self.layers, model.get_output_embeddings())
        self.forward_arguments = frozenset(inspect.signature(model.forward).parameters)
        self.trim_state: TrimState = "pending"  # whether reference rows can skip late layers

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        family: ModelFamily | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> TransformersBackend:
        """Load a hub name or local folder (``dtype`` may be a name such as ``"bfloat16"``)."""
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        resolved = resolve_family(
            family, AutoConfig.from_pretrained(name_or_path, revision=revision)
        )
        processor = load_processor(name_or_path, resolved, revision)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, revision=revision, dtype=dtype or "auto", **model_kwargs
        )
        if device is not None:
            model = model.to(torch.device(device))  # type: ignore[arg-type]  # decorated .to
        return cls(model, processor, resolved)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.model.dtype
        return dtype

    def default_image_size(self) -> tuple[int, int]:
        return self.family.default_image_size(self.processor)

    def resized_pixels(self, width: int, height: int) -> int:
        return self.family.resized_pixels(self.processor, width, height)

    def encode(
        self, renderings: Sequence[Rendering], continuation: torch.Tensor | None = None
    ) -> Inputs:
        texts = [self._prompt(r) for r in renderings]
        images: list[Any] | None
        if self.family.images_per_row:
            images = [list(r.images) for r in renderings]
        else:
            images = [image for r in renderings for image in r.images]
        if not any(r.images for r in renderings):
            images = None
        inputs = self.processor(
            text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"
        )
        if continuation is not None:
            inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation], dim=1)
            inputs["attention_mask"] = torch.cat(
                [inputs["attention_mask"], torch.ones_like(continuation)], dim=1
            )
            for name in ("token_type_ids", "mm_token_type_ids"):  # text tokens are type 0
                if name in inputs:
                    inputs[name] = torch.cat([inputs[name], torch.zeros_like(continuation)], 1)
            if "cross_attention_mask" in inputs:  # Mllama: new tokens see what the last one saw
                mask = inputs["cross_attention_mask"]
                extra = mask[:, -1:].expand(-1, continuation.shape[1], *mask.shape[2:])
                inputs["cross_attention_mask"] = torch.cat([mask, extra], dim=1)
        return dict(inputs.to(self.device))

    def _prompt(self, rendering: Rendering) -> str:
        return render_prompt(self.processor, rendering, self.takes_tools, self.tool_format)

    def grammars(self) -> GrammarCompiler:
        """The compiler of this model's answer constraints (built on first use)."""
        if self._grammars is None:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self._grammars = GrammarCompiler(
                self.tokenizer, vocab, self.stop_token_ids(), self.tool_format
            )
        return self._grammars

    def open_batch(self) -> TransformersBatch:
        """A new running batch on this model (continuous batching; see
        :mod:`guardrail.backends.transformers_batch`)."""
        return TransformersBatch(self)

    def first_logits(
        self, requests: Sequence[BackendRequest], extra: LayerPlan | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return TransformersBatch(self).first_logits(requests, extra)

    @torch.no_grad()
    def forward(
        self, inputs: Inputs, plan: LayerPlan | None, *, use_cache: bool = True
    ) -> torch.Tensor:
        with self.applied(plan):
            output = self.model(**inputs, use_cache=use_cache, logits_to_keep=1)
        logits: torch.Tensor = output.logits[:, -1]
        return logits

    @torch.no_grad()
    def capture_states(
        self, renderings: Sequence[Rendering], continuation: torch.Tensor | None = None
    ) -> torch.Tensor:
        span = 1 + (0 if continuation is None else continuation.shape[1])
        layers = range(self.num_layers)
        plan = CapturePlan(layers, span)
        self.forward(self.encode(renderings, continuation), plan, use_cache=False)
        return plan.stacked(layers)

    def stop_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.pad_token_id}
        return {int(t) for t in stops if t is not None}

    def applied(self, plan: LayerPlan | None) -> AbstractContextManager[None]:
        """Run the body with ``plan`` on this thread's forward passes (no-grad)."""
        return _no_grad_with(nullcontext() if plan is None else self.hooks.activate(plan))


def render_prompt(
    processor: Processor, rendering: Rendering, takes_tools: bool, fmt: ToolCallFormat
) -> str:
    """The chat template's text for ``rendering`` (tools through the template when it takes
    them, else in the documented prompt format of :mod:`guardrail.tools`); a rendering
    without template is its text as it stands."""
    if not rendering.template:
        return str(rendering.messages[0]["content"])
    messages, tools = rendering.messages, rendering.tools
    if not takes_tools:
        messages, tools = prompt_messages(messages, tools, fmt), ()
    text = processor.apply_chat_template(
        messages,
        tools=[dict(t) for t in tools] or None,
        add_generation_prompt=True,
        tokenize=False,
    )
    return str(text)


@contextmanager
def _no_grad_with(inner: AbstractContextManager[None]) -> Iterator[None]:
    with torch.no_grad(), inner:
        yield


def resolve_family(family: ModelFamily | str | None, config: Any) -> ModelFamily:
    """``family`` as a :class:`ModelFamily` (a name, or found from ``config`` when None)."""
    if isinstance(family, ModelFamily):
        return family
    return family_named(family) if family is not None else family_for(config)


_PLACEHOLDER_ATTRIBUTES = (
    "image_token",
    "video_token",
    "boi_token",
    "eoi_token",
    "fake_image_token",
    "global_image_tag",
)


def context_length(config: Any) -> int | None:
    """The text model's longest sequence, from its config (None when it does not say)."""
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def placeholders_of(processor: Processor, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The processor's and tokenizer's image and video placeholder strings."""
    found = {
        getattr(source, name, None)
        for source in (processor, tokenizer)
        for name in _PLACEHOLDER_ATTRIBUTES
    }
    return tuple(sorted(text for text in found if isinstance(text, str) and text))
