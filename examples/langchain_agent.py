"""The guarded chat model as the model of a LangChain agent with tools, offline.

The user sends a picture and a question; the agent calls a tool, reads its result and answers.
A second run calls a screenshot tool whose image result is untrusted: the next model call is
guarded at sample level. Each model call's safety decision is printed.
"""

import base64
import io

from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from adapters.langchain import ChatGuardedVLM
from guardrail.testing import fixture_path, synthetic_image


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    synthetic_image(seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(response_format="content_and_artifact")
def screenshot(page: str) -> tuple[list[dict], None]:
    """Take a screenshot of a web page."""
    return [{"type": "image", "base64": png_base64(1), "mime_type": "image/png"}], None


@wrap_model_call
def first_call_uses_a_tool(request, handler):
    """A 135M model rarely picks a tool by itself: require one on the first call (constrained
    decoding makes it a valid call), then let it answer in text."""
    used = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if used else "any"))


chat = ChatGuardedVLM.from_model_id(
    model=str(fixture_path("smollm")), app="agent-demo", max_tokens=40
)
agent = create_agent(model=chat, tools=[add, screenshot], middleware=[first_call_uses_a_tool])

for question in ("What is 3 plus 4? Use the add tool.", "Take a screenshot of example.com."):
    data_url = "data:image/png;base64," + png_base64(0)
    message = HumanMessage(
        content=[
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]
    )
    result = agent.invoke({"messages": [message]})
    for m in result["messages"][1:]:
        if isinstance(m, AIMessage):
            safety = m.response_metadata["safety"]
            calls = [(c["name"], c["args"]) for c in m.tool_calls]
            print(f"model: calls={calls} text={m.content!r}")
            print(f"  safety: {safety['mode_used']} trusted: {safety['trusted']}")
        else:
            print(f"tool {m.name}: {str(m.content)[:40]!r}")
