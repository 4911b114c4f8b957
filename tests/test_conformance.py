"""OpenAI conformance of the server, row by row of docs/serving.md, driven by the openai SDK
and raw HTTP against a server on a loopback port."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from adapters.server import AppSettings, ServerSettings, hash_key
from tests.test_server import IMAGE_MESSAGE, Served

KEY = "conformance-key"


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    settings = ServerSettings(
        model=str(tiny_path),
        store=f"file://{tmp_path_factory.mktemp('conformance')}",
        cors_origins=("https://app.example",),
        apps=(AppSettings(name="a", key_sha256=hash_key(KEY), max_tokens=64),),
    )
    served = Served(settings)
    yield served
    served.stop()


def _client(server: Served) -> openai.OpenAI:
    return server.client(KEY)


def _chat_openai(server: Served, **options):
    """LangChain's ChatOpenAI against the server."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=server.settings.model,
        base_url=f"{server.url}/v1",
        api_key=KEY,
        max_retries=0,
        **options,
    )


def test_models_list_and_retrieve_need_a_key_and_say_when_they_were_created(server):
    listed = _client(server).models.list()
    assert [m.id for m in listed.data] == [server.settings.model]
    assert listed.data[0].created > 1_700_000_000
    retrieved = _client(server).models.retrieve(server.settings.model)  # a path, slashes kept
    assert retrieved.id == server.settings.model and retrieved.owned_by == "cmrm-guardrail"
    with pytest.raises(openai.NotFoundError) as caught:
        _client(server).models.retrieve("gpt-4o")
    assert caught.value.body["param"] == "model"
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong key").models.list()


def test_every_response_carries_a_request_id(server):
    given = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    made = httpx.get(f"{server.url}/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    odd = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "has spaces in it"})
    assert odd.headers["x-request-id"] != "has spaces in it"  # replaced, never echoed raw
    answer = _client(server).chat.completions.with_raw_response.create(
        model=server.settings.model, messages=[IMAGE_MESSAGE], max_tokens=2
    )
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])


def test_cors_preflight_answers_the_configured_origins_only(server):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(
        f"{server.url}/v1/chat/completions",
        headers={"Origin": "https://app.example", **preflight},
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{server.url}/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers


def test_errors_name_the_parameter_at_fault(server):
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).chat.completions.create(
            model=server.settings.model, messages=[IMAGE_MESSAGE], temperature=3
        )
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).chat.completions.create(
            model=server.settings.model, messages=[IMAGE_MESSAGE], max_tokens=65
        )
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).chat.completions.create(
            model=server.settings.model, messages=[IMAGE_MESSAGE], logprobs=True
        )
    assert caught.value.body["param"] == "logprobs"


def test_text_response_format_and_logprobs_off_are_accepted(server):
    answer = _client(server).chat.completions.create(
        model=server.settings.model,
        messages=[IMAGE_MESSAGE],
        max_tokens=2,
        response_format={"type": "text"},
        logprobs=False,
    )
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.model_extra["safety"]["guarded"]


class _Broken:
    """A runner whose model call fails in a way nothing expects."""

    async def start(self):
        return None

    async def invoke(self, call):
        raise RuntimeError("boom")

    def stream(self, call):
        raise RuntimeError("boom")

    async def health(self):
        return {}


def test_an_unforeseen_error_is_a_counted_500_and_the_connection_stays_usable():
    """Starlette's own handler answered, then re-raised, and the server dropped the keep-alive
    connection: the client's next request on it failed (4 of 5 tries)."""
    served = Served(ServerSettings.development_mode("m"), runner=_Broken())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.Client(base_url=served.url) as http:
            answers = [http.post("/v1/chat/completions", json=body) for _ in range(5)]
            metrics = http.get("/metrics").text
    finally:
        served.stop()
    assert [a.status_code for a in answers] == [500] * 5
    assert answers[0].json()["error"] == {
        "message": "internal error: RuntimeError",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert 'guardrail_requests_total{app="unknown",status="500"} 5.0' in metrics


def test_penalties_bias_and_vllms_sampling_extensions_are_honoured(server):
    """ChatOpenAI(frequency_penalty=0.1) was a 400; now every one of these reaches the model."""
    chat = _chat_openai(server, max_tokens=4, frequency_penalty=0.1, presence_penalty=0.1)
    assert chat.invoke("hi").response_metadata["finish_reason"] in ("length", "stop")
    client = _client(server)
    plain = client.chat.completions.create(
        model=server.settings.model, messages=[IMAGE_MESSAGE], max_tokens=3
    )
    tokens = client.chat.completions.create(
        model=server.settings.model,
        messages=[IMAGE_MESSAGE],
        max_tokens=3,
        logit_bias={"42": 100},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2},
        temperature=0.7,
        seed=3,
    )
    assert tokens.usage.completion_tokens == 3
    forced = client.chat.completions.create(
        model=server.settings.model, messages=[IMAGE_MESSAGE], max_tokens=3, logit_bias={"42": 100}
    )
    assert forced.choices[0].message.content != plain.choices[0].message.content
    assert forced.model_extra["safety"]["guarded"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=server.settings.model, messages=[IMAGE_MESSAGE], presence_penalty=3
        )
    assert caught.value.body["param"] == "presence_penalty"


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def test_a_tool_call_cut_by_the_token_limit_is_sent_as_openai_sends_it(server):
    """It was dropped (tool_calls None), or streamed with name null and the raw text as its
    arguments. Now: the call with its name and the beginning of its arguments, finish_reason
    length; LangChain's parser makes it an invalid tool call."""
    client = _client(server)
    forced_add = {
        "model": server.settings.model,
        "messages": [{"role": "user", "content": "add 2 and 3"}],
        "tools": [ADD],
        "tool_choice": "required",
    }
    for limit in range(4, 64):
        answer = client.chat.completions.create(**forced_add, max_tokens=limit)
        calls = answer.choices[0].message.tool_calls
        if calls and calls[0].function.arguments:
            break
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and call.function.arguments.startswith("{")
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)  # cut short: not yet JSON
    streamed = client.chat.completions.create(**forced_add, max_tokens=limit, stream=True)
    deltas = [c.choices[0].delta.tool_calls for c in streamed if c.choices]
    named = [d[0].function.name for d in deltas if d]
    assert named == ["add"]
    chat = _chat_openai(server, max_tokens=limit).bind_tools([ADD], tool_choice="add")
    message = chat.invoke("add 2 and 3")
    assert message.tool_calls == [] and message.invalid_tool_calls[0]["name"] == "add"


def test_chat_openai_users_read_the_decision_from_the_response_headers(server):
    """ChatOpenAI drops unknown body fields; with include_response_headers it keeps headers."""
    from langchain_core.messages import HumanMessage

    chat = _chat_openai(server, max_tokens=2, include_response_headers=True)
    answer = chat.invoke([HumanMessage(content=IMAGE_MESSAGE["content"])])
    headers = answer.response_metadata["headers"]
    decision = json.loads(headers["x-guardrail-decision"])
    assert decision["guarded"] and decision["multimodal"]
    assert decision["call_id"] == headers["x-guardrail-call-id"]
