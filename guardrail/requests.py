"""Requests, and the three renderings CMRM needs: multimodal, text-only and corrupted."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from guardrail.config import CorruptionSpec, Mode
from guardrail.constraints import OutputConstraint
from guardrail.errors import InvalidInputError, MissingImagePlaceholderError
from guardrail.images import (
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    ImageInput,
    corruption_image,
    load_image,
)
from guardrail.tools import Tool, check_tools
from shift_store import ShiftVector

Message = dict[str, Any]


@dataclass(frozen=True)
class GuardRequest:
    """One generation request.

    ``prompt`` is a user text (images are placed before it) or a list of chat messages whose
    content holds ``{"type": "image"}`` parts, one per image, in order. ``alpha``, ``mode`` and
    ``shift`` override the model's :class:`~guardrail.GuardConfig` for this request only.
    ``trusted=False`` forces a sample-level shift; ``app`` and ``trust_reason`` are recorded in
    the decision. ``tools`` (OpenAI function definitions) are offered to the model in the
    request row and in both reference rows; ``constraint`` restricts the answer's form (the
    reference rows are not constrained: they follow the request row's tokens).
    ``template=False`` makes ``prompt`` the model's raw input text (a text completion): no
    chat template, no images, no tools.
    """

    prompt: str | Sequence[Message]
    images: Sequence[ImageInput] = ()
    alpha: float | None = None
    mode: Mode | None = None
    shift: ShiftVector | None = None
    app: str | None = None
    trusted: bool | None = None
    trust_reason: str | None = None
    tools: Sequence[Tool] = ()
    constraint: OutputConstraint | None = None
    template: bool = True


@dataclass(frozen=True)
class Rendering:
    """Chat messages plus decoded images (and the tools offered), ready for the processor.
    Without ``template``, the one message's text is the model's input as it stands."""

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    tools: tuple[Tool, ...] = ()
    template: bool = True

    @property
    def multimodal(self) -> bool:
        return bool(self.images)


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def render_request(
    request: GuardRequest, max_pixels: int = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> Rendering:
    """Validate ``request`` and decode its images, each within ``max_pixels`` and
    ``max_aspect_ratio`` and reduced to a working size (raises typed errors on bad input)."""
    images = [load_image(i, max_pixels, max_aspect_ratio=max_aspect_ratio) for i in request.images]
    tools = tuple(request.tools)
    check_tools(tools)
    if not request.template:
        if not isinstance(request.prompt, str) or images or tools:
            raise InvalidInputError("a raw prompt (no chat template) is text alone")
        return Rendering([{"role": "user", "content": request.prompt}], template=False)
    if isinstance(request.prompt, str):
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": request.prompt}]
        return Rendering([{"role": "user", "content": parts}], images, tools)
    messages = copy.deepcopy(list(request.prompt))
    if not messages:
        raise InvalidInputError("the conversation has no messages")
    placeholders = 0
    for message in messages:
        _check_message(message)
        if isinstance(message["content"], list):
            placeholders += sum(_is_image_part(p) for p in message["content"])
    if placeholders < len(images):
        raise MissingImagePlaceholderError(
            f"{len(images)} image(s) given but the prompt has {placeholders} image placeholder(s);"
            " add a {'type': 'image'} part for each image"
        )
    if placeholders > len(images):
        raise InvalidInputError(
            f"the prompt has {placeholders} image placeholder(s) but {len(images)} image(s)"
        )
    return Rendering(messages, images, tools)


def _check_message(message: Any) -> None:
    """A message is a dict with a text ``role`` and a ``content`` that is text, a list of typed
    parts (text parts with text), or empty beside tool calls."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise InvalidInputError("each message needs a 'role' and a 'content'")
    if not isinstance(message["role"], str):
        raise InvalidInputError("a message's role must be text")
    content = message["content"]
    if content is None and message.get("tool_calls"):
        message["content"] = ""
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidInputError("each content part needs a 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise InvalidInputError("a text part needs its 'text'")
            if part["type"] not in ("text", "image"):
                raise InvalidInputError(f"unsupported content part type {part['type']!r}")
    elif not isinstance(content, str):
        raise InvalidInputError("a message's content must be text or a list of parts")


def reject_placeholders(rendering: Rendering, placeholders: Sequence[str]) -> None:
    """Refuse text anywhere in the conversation (messages, tool calls, tool definitions) that
    contains the model's image placeholder tokens: images enter only as image parts, so typed
    placeholders would desynchronise text and images."""
    texts = [json.dumps(message, ensure_ascii=False) for message in rendering.messages]
    texts += [json.dumps(dict(tool), ensure_ascii=False) for tool in rendering.tools]
    for text in texts:
        found = [p for p in placeholders if p and p in text]
        if found:
            raise InvalidInputError(
                f"message text contains the reserved placeholder {found[0]!r}; "
                "attach images as image parts"
            )


def text_only(rendering: Rendering) -> Rendering:
    """The same conversation with every image part removed: the input ``x`` of ``h(x)``."""
    messages = []
    for message in rendering.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [p for p in content if not _is_image_part(p)]
        messages.append({**message, "content": content})
    return Rendering(messages, tools=rendering.tools, template=rendering.template)


def corrupted(
    rendering: Rendering, spec: CorruptionSpec, default_size: tuple[int, int]
) -> Rendering:
    """The same conversation with each image replaced by the meaningless image of ``spec``.

    The replacement keeps each image's size (so models with size-dependent image token counts see
    as many tokens); a text-only rendering gets one image of ``default_size`` before its last text.
    """
    if rendering.images:
        images = [corruption_image(spec, image.size) for image in rendering.images]
        return Rendering(rendering.messages, images, rendering.tools)
    messages = copy.deepcopy(rendering.messages)
    last_user = next(m for m in reversed(messages) if m["role"] == "user")
    content = last_user["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    last_user["content"] = [{"type": "image"}, *content]
    return Rendering(messages, [corruption_image(spec, default_size)], rendering.tools)
