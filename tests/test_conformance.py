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
            model=server.settings.model, messages=[IMAGE_MESSAGE], n=17
        )
    assert caught.value.body["param"] == "n"


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


def test_chat_logprobs_are_the_answers_own_tokens_most_likely_first(server):
    answer = _client(server).chat.completions.create(
        model=server.settings.model,
        messages=[IMAGE_MESSAGE],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    choice = answer.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 4
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        best = [t.logprob for t in entry.top_logprobs]
        assert len(best) == 3 and best == sorted(best, reverse=True)
        assert entry.logprob == best[0] and entry.token == entry.top_logprobs[0].token  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    plain = _client(server).chat.completions.create(
        model=server.settings.model, messages=[IMAGE_MESSAGE], max_tokens=4
    )
    assert plain.choices[0].logprobs is None


def test_n_choices_match_their_seeded_single_answers_whole_and_streamed(server):
    client, model = _client(server), server.settings.model
    asked = {"model": model, "messages": [IMAGE_MESSAGE], "max_tokens": 5, "temperature": 1.0}
    answer = client.chat.completions.create(**asked, n=3, seed=7)
    texts = [c.message.content for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**asked, seed=7 + i) for i in range(3)]
    assert texts == [s.choices[0].message.content for s in singles]
    assert len(set(texts)) > 1
    assert answer.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert answer.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once
    streamed = ["", "", ""]
    safety = []
    for chunk in client.chat.completions.create(**asked, n=3, seed=7, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
        safety += [chunk.model_extra["safety"]] if "safety" in chunk.model_extra else []
    assert streamed == texts
    assert len(safety) == 1 and safety[0]["guarded"]


def test_text_completions_take_raw_prompts_unguarded_as_text_only(server):
    """/v1/completions was a 404. The prompt is the model's input as it stands (no chat
    template); text-only, so the guard passes it through and says so."""
    from transformers import AutoTokenizer

    client, model = _client(server), server.settings.model
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = "The picture shows"
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=2)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert "".join(choice.logprobs.tokens) == choice.text
    pairs = zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True)
    for top, chosen in pairs:  # greedy: the chosen token is the most likely one
        assert 1 <= len(top) <= 2 and max(top.values()) == chosen  # (tokens of one text merge)
    safety = answer.model_extra["safety"]
    assert not safety["multimodal"] and safety["mode_used"] == "text-only"
    batch = client.completions.create(model=model, prompt=["Hello", prompt], max_tokens=4, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[2].text == batch.choices[3].text == choice.text  # greedy
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt=prompt, echo=True)
    assert caught.value.body["param"] == "echo"


def test_langchains_completion_model_runs_on_the_server(server):
    from langchain_openai import OpenAI

    llm = OpenAI(
        model=server.settings.model,
        base_url=f"{server.url}/v1",
        api_key=KEY,
        max_tokens=4,
        temperature=0,
        max_retries=0,
    )
    direct = _client(server).completions.create(
        model=server.settings.model, prompt="The picture shows", max_tokens=4
    )
    assert llm.invoke("The picture shows") == direct.choices[0].text
    assert llm.batch(["The picture shows", "Hello"])[0] == direct.choices[0].text


RESPONSES_IMAGE = {
    "role": "user",
    "content": [
        {"type": "input_text", "text": "What is in this picture?"},
        {"type": "input_image", "image_url": IMAGE_MESSAGE["content"][1]["image_url"]["url"]},
    ],
}


def test_responses_api_answers_text_and_images_like_chat_completions(server):
    """/v1/responses was a 404. Stateless: the items run as the same chat completion."""
    client, model = _client(server), server.settings.model
    response = client.responses.create(
        model=model, input=[RESPONSES_IMAGE], instructions="Be brief.", max_output_tokens=5
    )
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, IMAGE_MESSAGE],
        max_tokens=5,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.status == "incomplete"  # cut at max_output_tokens, as OpenAI says
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5
    assert response.model_extra["safety"]["guarded"]
    events = list(
        client.responses.create(
            model=model, input=[RESPONSES_IMAGE], max_output_tokens=5, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text and final.model_extra["safety"]["guarded"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, input="hi", previous_response_id="resp_1")
    assert caught.value.body["param"] == "previous_response_id"


PICK = {
    "type": "function",
    "name": "pick",
    "description": "Pick the picture's colour.",
    "parameters": {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["colour"],
    },
}


def test_responses_api_calls_tools_and_follows_a_schema(server):
    client, model = _client(server), server.settings.model
    response = client.responses.create(
        model=model, input="which colour?", tools=[PICK], tool_choice="required"
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "pick" and json.loads(call.arguments)["colour"] in ("red", "blue")
    assert response.status == "completed"
    follow_up = [
        {"role": "user", "content": "which colour?"},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": "pick",
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "noted"},
    ]
    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "user", "content": "which colour?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "pick", "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "noted"},
        ],
        max_tokens=3,
    )
    answer = client.responses.create(model=model, input=follow_up, max_output_tokens=3)
    assert answer.output_text == chat.choices[0].message.content  # the same conversation
    schema = PICK["parameters"] | {"additionalProperties": False}
    shaped = client.responses.create(
        model=model,
        input=[RESPONSES_IMAGE],
        text={"format": {"type": "json_schema", "name": "Colour", "schema": schema}},
    )
    assert json.loads(shaped.output_text)["colour"] in ("red", "blue")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, input="hi", tools=[PICK], tool_choice="any")
    assert caught.value.body["param"] == "tool_choice"


def test_chat_openai_on_the_responses_api(server):
    """ChatOpenAI(use_responses_api=True) was a 404: invoke, stream, tools, structured output."""
    from typing import Literal

    from langchain_core.messages import HumanMessage
    from pydantic import BaseModel

    chat = _chat_openai(server, max_tokens=5, use_responses_api=True)
    question = [HumanMessage(content=IMAGE_MESSAGE["content"])]
    answer = chat.invoke(question)
    assert answer.text and answer.response_metadata["status"] == "incomplete"
    streamed = "".join(chunk.text for chunk in chat.stream(question))
    assert streamed == answer.text
    picking = _chat_openai(server, use_responses_api=True).bind_tools([PICK], tool_choice="pick")
    (call,) = picking.invoke("which colour?").tool_calls
    assert call["name"] == "pick" and call["args"]["colour"] in ("red", "blue")

    class Colour(BaseModel):
        colour: Literal["red", "blue"]

    shaped = _chat_openai(server, use_responses_api=True).with_structured_output(Colour)
    assert isinstance(shaped.invoke(question), Colour)
    assert isinstance(list(shaped.stream(question))[-1], Colour)


def test_a_streams_headers_carry_the_decision_as_planned(server):
    """A stream's record comes in its last chunk, which ChatOpenAI drops; its headers carry
    the decision as planned before generation, with the same call id."""
    from langchain_core.messages import HumanMessage

    raw = _client(server).chat.completions.with_raw_response.create(
        model=server.settings.model, messages=[IMAGE_MESSAGE], max_tokens=3, stream=True
    )
    planned = json.loads(raw.headers["x-guardrail-decision"])
    last = [c for c in raw.parse() if c.choices][-1]
    final = last.model_extra["safety"]
    assert planned["call_id"] == final["call_id"] == raw.headers["x-guardrail-call-id"]
    assert planned["guarded"] and planned["mode_used"] == final["mode_used"]
    assert planned["alpha"] == final["alpha"] and final["batch"] and planned["batch"] is None
    chat = _chat_openai(server, max_tokens=3, include_response_headers=True)
    chunks = list(chat.stream([HumanMessage(content=IMAGE_MESSAGE["content"])]))
    headers = chunks[0].response_metadata["headers"]
    assert json.loads(headers["x-guardrail-decision"])["guarded"]


async def test_the_async_sdk_and_chat_openais_async_paths(server):
    """AsyncOpenAI (chat whole and streamed, completions, responses streamed) and ChatOpenAI's
    ainvoke and astream answer as their synchronous forms."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    model = server.settings.model
    asked = {"model": model, "messages": [IMAGE_MESSAGE], "max_tokens": 4}
    whole = await client.chat.completions.create(**asked)
    assert whole.choices[0].message.content == (
        _client(server).chat.completions.create(**asked).choices[0].message.content
    )
    streamed = "".join(
        [
            c.choices[0].delta.content or ""
            async for c in await client.chat.completions.create(**asked, stream=True)
            if c.choices
        ]
    )
    assert streamed == whole.choices[0].message.content
    completion = await client.completions.create(model=model, prompt="Hello", max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    events = [
        e
        async for e in await client.responses.create(
            model=model, input=[RESPONSES_IMAGE], max_output_tokens=4, stream=True
        )
    ]
    assert events[-1].response.output_text == whole.choices[0].message.content
    chat = _chat_openai(server, max_tokens=4)
    from langchain_core.messages import HumanMessage

    question = [HumanMessage(content=IMAGE_MESSAGE["content"])]
    assert (await chat.ainvoke(question)).text == whole.choices[0].message.content
    assert (
        "".join([c.text async for c in chat.astream(question)]) == whole.choices[0].message.content
    )
    await client.close()
