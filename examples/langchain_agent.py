"""The guarded chat model as the model of a LangChain agent (no tools: it has no tool calling)."""

import base64
import io

from langchain.agents import create_agent
from langchain_core.messages import HumanMessage

from adapters.langchain import ChatGuardedVLM
from guardrail.testing import fixture_path, synthetic_image

buffer = io.BytesIO()
synthetic_image(0).save(buffer, format="PNG")
data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

chat = ChatGuardedVLM(
    model=str(fixture_path("smollm")),
    app="agent-demo",
    alpha=1.0,
    max_tokens=24,
    trust_policy="image-source",
)
agent = create_agent(model=chat, tools=[], system_prompt="You are a careful assistant.")
result = agent.invoke(
    {
        "messages": [
            HumanMessage(
                content=[
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ]
            )
        ]
    }
)
answer = result["messages"][-1]
print(answer.content)
print(
    "safety:",
    answer.response_metadata["safety"]["mode_used"],
    "trusted:",
    answer.response_metadata["safety"]["trusted"],
)
