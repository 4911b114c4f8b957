"""The chat model inside LangChain agents and LangGraph graphs, with and without tools."""

from __future__ import annotations

import json
import logging
from typing import Annotated, TypedDict

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pydantic import BaseModel

from adapters.langchain import ChatGuardedVLM

from .test_adapter import openai_image
from .test_tools_langchain import B64


@pytest.fixture(scope="module")
def chat(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("agents")
    return ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="agents", store=f"file://{store}", max_tokens=5
    )


def test_create_agent_without_tools_guards_multimodal_turns(chat):
    agent = create_agent(model=chat, tools=[], system_prompt="You are terse.")
    out = agent.invoke({"messages": [openai_image()]})
    answer = out["messages"][-1]
    assert [type(m).__name__ for m in out["messages"]] == ["HumanMessage", "AIMessage"]
    assert answer.response_metadata["safety"]["guarded"]
    assert answer.response_metadata["safety"]["mode_used"] == "dataset"


def test_inside_a_langgraph_graph(chat):
    class State(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]

    graph = StateGraph(State)
    graph.add_node("model", lambda state: {"messages": [chat.invoke(state["messages"])]})
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    out = graph.compile().invoke(
        {
            "messages": [
                openai_image(),
            ]
        }
    )
    assert out["messages"][-1].response_metadata["safety"]["guarded"]
    streamed = list(
        graph.compile().stream({"messages": [HumanMessage("hi")]}, stream_mode="messages")
    )
    assert streamed and all(meta["langgraph_node"] == "model" for _, meta in streamed)


# ---------------------------------------------------------------- agents with tools


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(response_format="content_and_artifact")
def screenshot(page: str) -> tuple[list[dict], None]:
    """Take a screenshot of a web page."""
    image = {"type": "image", "base64": B64, "mime_type": "image/png"}
    return [image], None


def _first_call_uses(name: str | None):
    """Small models rarely choose a tool unprompted: the first call must call ``name`` (any
    tool when None); once a tool has answered, the model answers in text."""

    @wrap_model_call
    def force(request, handler):
        used = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if used else (name or "any")))

    return force


class _Decisions(BaseCallbackHandler):
    def __init__(self) -> None:
        self.call_ids: list[str] = []

    def on_custom_event(self, name, data, **kwargs) -> None:
        self.call_ids.append(data["call_id"])


@pytest.fixture(scope="module")
def smollm_agent_chat(smollm_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("agent-tools")
    return ChatGuardedVLM.from_model_id(
        model=str(smollm_path), app="agent", store=f"file://{store}", max_tokens=40
    )


def test_an_agent_with_tools_and_an_image_calls_a_tool_and_answers(smollm_agent_chat, caplog):
    agent = create_agent(
        model=smollm_agent_chat, tools=[add, screenshot], middleware=[_first_call_uses(None)]
    )
    decisions = _Decisions()
    question = openai_image(text="What is 3 plus 4? Use the add tool.")
    with caplog.at_level(logging.INFO, logger="guardrail.decisions"):
        out = agent.invoke({"messages": [question]}, {"callbacks": [decisions]})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    call = out["messages"][1].tool_calls[0]
    assert (call["name"], call["args"]) == ("add", {"a": 3, "b": 4})
    assert out["messages"][2].content == "7"
    assert out["messages"][3].content and not out["messages"][3].tool_calls
    answers = [m for m in out["messages"] if isinstance(m, AIMessage)]
    call_ids = [m.response_metadata["safety"]["call_id"] for m in answers]
    # the first call offers tools: sample level (a dataset-level shift calibrated without tools
    # fits worse); the last has tool_choice="none", so no tools are offered: dataset level
    modes = [m.response_metadata["safety"]["mode_used"] for m in answers]
    assert modes == ["sample", "dataset"]
    assert decisions.call_ids == call_ids  # exactly one event per model call
    logged = [json.loads(r.getMessage())["call_id"] for r in caplog.records]
    assert logged == call_ids


def test_an_image_returned_by_a_tool_makes_the_next_call_sample_level(smollm_agent_chat):
    agent = create_agent(
        model=smollm_agent_chat,
        tools=[add, screenshot],
        middleware=[_first_call_uses("screenshot")],
    )
    out = agent.invoke({"messages": [HumanMessage("What is on example.com?")]})
    first, result, last = out["messages"][1:]
    assert first.tool_calls[0]["name"] == "screenshot"
    assert first.response_metadata["safety"]["mode_used"] == "text-only"
    assert isinstance(result, ToolMessage) and result.content[0]["type"] == "image"
    safety = last.response_metadata["safety"]
    assert safety["guarded"] and safety["mode_used"] == "sample"
    assert "tool" in safety["trust_reason"]


def test_create_agent_with_a_response_format(tiny_path, tmp_path):
    class Verdict(BaseModel):
        safe: bool

    chat = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="agents", store=f"file://{tmp_path}"
    )
    agent = create_agent(model=chat, tools=[], response_format=Verdict)
    out = agent.invoke({"messages": [openai_image()]})
    assert isinstance(out["structured_response"], Verdict)
    assert out["messages"][-1].response_metadata["safety"]["mode_used"] == "dataset"
