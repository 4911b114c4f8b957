"""``ChatGuardedVLM(backend="vllm")``: the LangChain chat model on a vLLM engine, with a forced
tool call and structured output through vLLM's structured outputs, at sample level."""

from __future__ import annotations

import base64
import io
from typing import Literal

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from adapters.langchain import ChatGuardedVLM
from guardrail.testing import fixture_path, synthetic_image


@tool
def weather(city: Literal["Paris", "Oslo"]) -> str:
    """The weather in a city."""
    return "sunny"


class Scene(BaseModel):
    colour: str
    objects: int


def _image_message(text: str) -> HumanMessage:
    buffer = io.BytesIO()
    synthetic_image(9, (200, 150)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return HumanMessage(
        content=[
            {"type": "image", "base64": data, "mime_type": "image/png"},
            {"type": "text", "text": text},
        ]
    )


def test_chat_model_on_vllm_calls_tools_and_answers_in_a_schema_at_sample_level():
    chat = ChatGuardedVLM(
        model=str(fixture_path("smollm")),
        backend="vllm",
        engine_args={"max_model_len": 1024, "dtype": "float32"},
        app="vllm-agent",
        mode="sample",
        max_tokens=64,
    )
    answer = chat.bind_tools([weather], tool_choice="weather").invoke(
        [_image_message("What is the weather where this was taken?")]
    )
    (call,) = answer.tool_calls
    assert call["name"] == "weather" and call["args"]["city"] in ("Paris", "Oslo")
    safety = answer.response_metadata["safety"]
    assert safety["guarded"] and safety["mode_used"] == "sample" and safety["shift_norm"] > 0
    scene = chat.with_structured_output(Scene).invoke([_image_message("Describe the scene.")])
    assert isinstance(scene, Scene)
