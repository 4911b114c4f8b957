"""Locally built models for tests, benchmarks and the demo; not imported by the engine."""

from typing import Any

from guardrail.anchors import bundled_anchor_prompts as anchor_prompts
from guardrail.testing.fixtures import (
    FIXTURES,
    SMOLLM_GGUF,
    build_smollm_llava,
    build_tiny_llava,
    fixture_path,
    smollm_gguf_dir,
    synthetic_image,
)
from guardrail.testing.tiny import TINY_FAMILIES, build_tiny_vlm


def function_tool(name: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAI function definition whose required ``parameters`` have the given JSON types."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": kind} for k, kind in parameters.items()},
                "required": list(parameters),
            },
        },
    }


__all__ = [
    "FIXTURES",
    "SMOLLM_GGUF",
    "TINY_FAMILIES",
    "anchor_prompts",
    "build_smollm_llava",
    "build_tiny_llava",
    "build_tiny_vlm",
    "fixture_path",
    "function_tool",
    "smollm_gguf_dir",
    "synthetic_image",
]
