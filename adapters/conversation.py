"""Framework-neutral pieces of every front end: a conversation in the engine's format with its
images and their sources, image blocks decoded or fetched, and OpenAI's ``tool_choice`` and
``response_format`` spellings turned into the engine's output constraints."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from adapters.remote_images import RemoteImageFetcher
from guardrail.constraints import OutputConstraint
from guardrail.errors import InvalidImageError, InvalidInputError
from guardrail.tools import Tool, check_tools, tool_name
from guardrail.trust import ImageSource


class UnsupportedContentError(InvalidInputError):
    """A content block the guard cannot handle (audio, files...): refused, never passed on."""


@dataclass
class Conversation:
    """Chat messages in the engine's format, the raw image bytes and each image's source."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    sources: list[ImageSource] = field(default_factory=list)

    def add(self, role: str, parts: list[dict[str, Any]], **extra: Any) -> None:
        """Append a message; its content is plain text unless it holds an image part."""
        has_image = any(p["type"] == "image" for p in parts)
        content: str | list[dict[str, Any]] = (
            parts if has_image else "".join(p["text"] for p in parts)
        )
        self.messages.append({"role": role, "content": content, **extra})

    def image_part(self, data: bytes, source: ImageSource, role: str) -> dict[str, Any]:
        """Keep an image and return its placeholder part. Only the user's and the system's
        images keep their ``source``: in a message of any other role (a tool or function
        result, an assistant turn, a role no policy knows) an image counts as ``tool``."""
        self.images.append(data)
        self.sources.append(source if role in ("user", "system") else "tool")
        return {"type": "image"}


def decode_base64(data: object, max_bytes: int) -> bytes:
    """Inline image bytes, under the same byte cap as a remote image."""
    if not isinstance(data, str):
        raise InvalidImageError(f"image data must be base64 text, not {type(data).__name__}")
    if len(data) // 4 * 3 > max_bytes:
        raise InvalidImageError(
            f"inline image of about {len(data) // 4 * 3} bytes exceeds {max_bytes}"
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"image data is not valid base64: {e}") from e


def image_from_url(url: object, fetcher: RemoteImageFetcher) -> tuple[bytes, ImageSource]:
    """A data URL's bytes (inline), or a remote image fetched under the fetcher's rules."""
    if not isinstance(url, str):
        raise InvalidImageError(f"image URL must be text, not {type(url).__name__}")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise InvalidImageError("data URLs must be base64-encoded")
        return decode_base64(data, fetcher.max_bytes), "inline"
    if url:
        return fetcher.fetch(url), "remote"
    raise InvalidImageError("image block has neither data nor URL")


def tool_choice_value(choice: Any, tools: Sequence[Tool]) -> str:
    """LangChain's and OpenAI's spellings of ``tool_choice`` as ``auto``, ``none``,
    ``required`` or a tool's name (the tools' form is checked first; their names' uniqueness
    when a request offers them)."""
    check_tools(tools, unique=False)
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


def answer_constraint(
    tools: Sequence[Tool], choice: str, response_format: Any
) -> OutputConstraint | None:
    """What constrained decoding must hold the answer to, if anything: a tool call when one is
    required; the response format, or a tool call when tools are offered too."""
    plain = response_format is None or (
        isinstance(response_format, dict) and response_format.get("type") == "text"
    )
    answer = None if plain else response_constraint(response_format)
    if not tools or choice == "none":
        return answer
    if choice == "auto":
        return None if answer is None else answer.or_else(OutputConstraint.tool_call(tools))
    return OutputConstraint.tool_call(tools, None if choice == "required" else choice)


def response_constraint(response_format: Any) -> OutputConstraint:
    """An OpenAI ``response_format`` (or a pydantic class) as an output constraint."""
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        return OutputConstraint.json_schema(response_format.model_json_schema())
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return OutputConstraint.any_json()
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema")
        if isinstance(schema, dict):
            return OutputConstraint.json_schema(schema)
    raise InvalidInputError(
        "response_format must be {'type': 'text'}, {'type': 'json_object'}, "
        "{'type': 'json_schema', "
        f"'json_schema': {{'schema': ...}}}} or a pydantic class, not {response_format!r}"
    )
