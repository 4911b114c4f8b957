"""Input limits of one request, checked before any model work: images per request, JSON nesting
depth, and prompt length (see :class:`~guardrail.config.GuardConfig`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

from guardrail.errors import InvalidInputError

# A prompt of more than this many UTF-8 bytes per allowed token is refused before tokenizing
# (tokenizing megabytes costs seconds; real tokens average 3 to 5 bytes).
BYTES_PER_TOKEN_CEILING = 64


def parse_json(text: str, what: str = "JSON text") -> Any:
    """``json.loads`` for untrusted text: too deep or malformed is an :class:`InvalidInputError`,
    never a ``RecursionError``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{what} is not JSON: {e}") from e
    except RecursionError as e:
        raise InvalidInputError(f"{what} is nested too deeply") from e


def json_depth(value: Any) -> int:
    """Nesting depth of lists and dicts in ``value`` (iterative: any depth is safe)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_depth(value: Any, limit: int, what: str) -> None:
    """Raise :class:`InvalidInputError` when ``value`` nests deeper than ``limit``."""
    depth = json_depth(value)
    if depth > limit:
        raise InvalidInputError(f"{what} nests {depth} levels deep (at most {limit})")


def check_images(count: int, limit: int) -> None:
    if count > limit:
        raise InvalidInputError(f"{count} images in one request (at most {limit})")


def check_prompt_tokens(
    messages: list[dict[str, Any]],
    tools: tuple[Any, ...],
    tokenizer: PreTrainedTokenizerBase,
    limit: int,
) -> int:
    """The number of text tokens in ``messages`` and ``tools`` (chat-template and image tokens
    not counted); raise :class:`InvalidInputError` over ``limit``."""
    text = "\n".join(_texts(messages, tools))
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit * BYTES_PER_TOKEN_CEILING:
        raise InvalidInputError(
            f"prompt of {size:,} bytes is over the {limit:,}-token limit (refused unread)"
        )
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if count > limit:
        raise InvalidInputError(f"prompt of {count:,} tokens (at most {limit:,})")
    return count


def _texts(messages: list[dict[str, Any]], tools: tuple[Any, ...]) -> Iterator[str]:
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]
        for call in message.get("tool_calls") or ():
            yield json.dumps(call, ensure_ascii=False)
    for tool in tools:
        yield json.dumps(dict(tool), ensure_ascii=False)
