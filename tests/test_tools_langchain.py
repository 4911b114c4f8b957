"""Tools and structured output through the LangChain chat model."""

from __future__ import annotations

import base64
import json
import logging
from typing import Literal

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from adapters.langchain import ChatGuardedVLM
from adapters.messages import to_conversation
from adapters.remote_images import RemoteImageFetcher
from guardrail import InvalidInputError

from .test_adapter import PNG, _decisions, _Events, openai_image


@tool
def weather(city: Literal["Paris", "Oslo"]) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


@tool
def ping() -> str:
    """Check the service."""
    return "pong"


@pytest.fixture(scope="module")
def chat(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("tools")
    return ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="tools", store=f"file://{store}", max_tokens=120
    )


@pytest.fixture(scope="module")
def smollm_chat(smollm_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("tools-smollm")
    return ChatGuardedVLM.from_model_id(
        model=str(smollm_path), app="tools", store=f"file://{store}", max_tokens=48
    )


def _image_tool_result(block: dict) -> list:
    return [
        HumanMessage("Show me the page."),
        AIMessage("", tool_calls=[{"name": "ping", "args": {}, "id": "c1"}]),
        ToolMessage(content=[block], tool_call_id="c1", name="ping"),
    ]


B64 = base64.b64encode(PNG).decode()
IMAGE_BLOCKS = {
    "openai": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},
    "v1": {"type": "image", "base64": B64, "mime_type": "image/png"},
}


# ---------------------------------------------------------------- tool calls


@pytest.mark.parametrize(
    "choice, names",
    [
        ("any", {"weather", "ping"}),
        ("required", {"weather", "ping"}),
        (True, {"weather", "ping"}),
        ("weather", {"weather"}),
        ({"type": "function", "function": {"name": "ping"}}, {"ping"}),
    ],
)
def test_a_required_tool_call_is_made_and_parsed(chat, choice, names):
    answer = chat.bind_tools([weather, ping], tool_choice=choice).invoke([openai_image()])
    (call,) = answer.tool_calls
    assert call["name"] in names and call["id"].startswith("call_")
    assert (
        call["args"] == {} if call["name"] == "ping" else call["args"]["city"] in ("Paris", "Oslo")
    )
    assert answer.content == "" and not answer.invalid_tool_calls
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    assert answer.response_metadata["safety"]["guarded"]


def test_auto_and_none_leave_the_answer_free(chat):
    auto = chat.bind_tools([weather]).invoke("Weather in Oslo?")
    none = chat.bind_tools([weather], tool_choice="none").invoke("Weather in Oslo?")
    unbound = chat.invoke("Weather in Oslo?")
    # the random model does not choose to call; "none" does not offer the tools at all
    assert not auto.tool_calls and not none.tool_calls
    prompt_tokens = [m.usage_metadata["input_tokens"] for m in (auto, none, unbound)]
    assert prompt_tokens[0] > prompt_tokens[1] == prompt_tokens[2]


def test_a_tool_choice_that_names_no_tool_is_refused(chat):
    with pytest.raises(InvalidInputError, match="names none of the tools"):
        chat.bind_tools([weather], tool_choice="search")
    with pytest.raises(InvalidInputError, match="response_format"):
        chat.invoke("hi", response_format={"type": "xml"})


def test_tool_calls_and_results_reach_the_model_as_a_conversation():
    history = [
        HumanMessage("Weather in Oslo?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Oslo"}, "id": "c7"}]),
        ToolMessage("Sunny in Oslo", tool_call_id="c7", name="weather"),
    ]
    conversation = to_conversation(history, RemoteImageFetcher())
    assert conversation.messages == [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "c7",
                    "function": {"name": "weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "Sunny in Oslo", "tool_call_id": "c7", "name": "weather"},
    ]


def test_a_conversation_with_tool_results_is_answered(chat):
    history = [
        HumanMessage("Weather in Oslo?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Oslo"}, "id": "c7"}]),
        ToolMessage("Sunny in Oslo", tool_call_id="c7", name="weather"),
    ]
    with_result = chat.bind_tools([weather]).invoke(history)
    without = chat.bind_tools([weather]).invoke(history[:1])
    grown = with_result.usage_metadata["input_tokens"] - without.usage_metadata["input_tokens"]
    assert grown > len("Sunny in Oslo")  # the call and its result are in the prompt


@pytest.mark.parametrize("form", sorted(IMAGE_BLOCKS))
def test_an_image_from_a_tool_is_untrusted_and_guarded_at_sample_level(chat, form):
    answer = chat.bind_tools([ping]).invoke(_image_tool_result(IMAGE_BLOCKS[form]))
    safety = answer.response_metadata["safety"]
    assert safety["guarded"] and safety["mode_used"] == "sample"
    assert "tool" in safety["trust_reason"]
    inline = chat.invoke([openai_image()])  # the same image from the application is trusted
    assert inline.response_metadata["safety"]["mode_used"] == "dataset"


def test_streamed_tool_calls_match_the_invoked_ones(chat):
    bound = chat.bind_tools([weather, ping], tool_choice="any")
    chunks = list(bound.stream([openai_image()]))
    assert not any("<tool_call>" in str(c.content) for c in chunks)
    (with_calls,) = [c for c in chunks if c.tool_call_chunks]
    assert with_calls.tool_call_chunks[0]["index"] == 0
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    invoked = bound.invoke([openai_image()])
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [
        (c["name"], c["args"]) for c in invoked.tool_calls
    ]
    assert whole.response_metadata["finish_reason"] == "tool_calls"


def test_tools_are_part_of_the_cache_key(chat):
    cache = InMemoryCache()
    set_llm_cache(cache)
    try:
        first = chat.bind_tools([weather], tool_choice="any").invoke("Weather?")
        other = chat.bind_tools([ping], tool_choice="any").invoke("Weather?")
        again = chat.bind_tools([weather], tool_choice="any").invoke("Weather?")
    finally:
        set_llm_cache(None)
    assert first.tool_calls[0]["name"] == "weather" and other.tool_calls[0]["name"] == "ping"
    assert len(cache._cache) == 2
    assert any("replayed" in f for f in again.response_metadata["safety"]["fallbacks"])


# ---------------------------------------------------------------- structured output


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_by_each_method(smollm_chat):
    prompt = "Anna is 31 years old. Extract the person."
    assert smollm_chat.with_structured_output(Person).invoke(prompt) == Person(name="Anna", age=31)
    by_call = smollm_chat.with_structured_output(Person, method="function_calling")
    assert by_call.invoke(prompt) == Person(name="Anna", age=31)
    as_json = smollm_chat.with_structured_output(None, method="json_mode").invoke(prompt)
    assert isinstance(as_json, dict) and as_json
    raw = smollm_chat.with_structured_output(Person, include_raw=True).invoke(prompt)
    assert raw["parsed"] == Person(name="Anna", age=31) and raw["parsing_error"] is None
    assert raw["raw"].response_metadata["safety"]["mode_used"] == "text-only"
    assert json.loads(raw["raw"].content) == {"name": "Anna", "age": 31}


def test_a_response_format_beside_tools_allows_either(chat):
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "schema": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
            }
        },
    }
    answers = [
        chat.bind_tools([ping], response_format=fmt).invoke(prompt)
        for prompt in ("Check the service.", "Is it up?", "Hello", "Status?")
    ]
    for answer in answers:
        assert answer.tool_calls == [] or answer.tool_calls[0]["name"] == "ping"
        if not answer.tool_calls:
            assert isinstance(json.loads(answer.content)["ok"], bool)


# ---------------------------------------------------------------- decisions in every path


def test_every_streaming_path_sends_one_decision_event(chat, caplog):
    events = _Events()
    config = {"callbacks": [events]}
    with caplog.at_level(logging.INFO, logger="guardrail.decisions"):
        (last,) = [c for c in chat.stream([openai_image()], config) if c.response_metadata]
        assert events.names == ["guardrail_decision"]
        import asyncio

        async def run_async():
            return [c async for c in chat.astream([openai_image()], config)]

        asyncio.run(run_async())
        assert events.names == ["guardrail_decision"] * 2

        async def run_events():
            return [e async for e in chat.astream_events([openai_image()], version="v2")]

        streamed = asyncio.run(run_events())
    custom = [e for e in streamed if e["event"] == "on_custom_event"]
    assert [e["name"] for e in custom] == ["guardrail_decision"]
    logged = [d["call_id"] for d in _decisions(caplog)]
    assert len(logged) == 3 and logged[0] == last.response_metadata["safety"]["call_id"]
    assert custom[0]["data"]["call_id"] == logged[2]
