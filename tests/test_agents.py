"""The chat model inside LangChain agents and LangGraph graphs (no tool calling)."""

from __future__ import annotations

from typing import Annotated, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from adapters.langchain import ChatGuardedVLM

from .test_adapter import openai_image


@pytest.fixture(scope="module")
def chat(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("agents")
    return ChatGuardedVLM(model=str(tiny_path), app="agents", store=f"file://{store}", max_tokens=5)


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
