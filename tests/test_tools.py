"""Tools in the engine: prompt formats, parsing, and constrained decoding beside CMRM."""

from __future__ import annotations

import json

import pytest
import torch

from guardrail import GuardConfig, GuardedVLM, GuardRequest, InvalidInputError
from guardrail.constraints import OutputConstraint
from guardrail.images import corruption_image
from guardrail.tool_formats import HERMES
from guardrail.tools import prompt_messages, takes_tools

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
        },
    },
}
PING = {
    "type": "function",
    "function": {"name": "ping", "description": "Check the service.", "parameters": {}},
}
# A Hermes-style template that renders tools itself (as Qwen2.5-VL's does).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- prompt format and parsing


def test_tool_support_is_read_from_the_template():
    assert takes_tools(TOOLS_TEMPLATE)
    assert not takes_tools("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not takes_tools(None)


def test_templates_without_tools_get_the_documented_format():
    messages = [
        {"role": "user", "content": "3+4?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "7"},
        {"role": "tool", "tool_call_id": "2", "content": [{"type": "image"}]},
    ]
    out = prompt_messages(messages, [ADD], HERMES)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert "<tools>\n" + json.dumps(ADD) + "\n</tools>" in out[0]["content"]
    assert (
        out[2]["content"]
        == '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    )
    assert "tool_calls" not in out[2]
    # two results in a row share one user turn; the image part is kept in place
    texts = [p.get("text") for p in out[3]["content"]]
    assert texts == [
        "<tool_response>\n",
        "7",
        "\n</tool_response>",
        "\n",
        "<tool_response>\n",
        None,
        "\n</tool_response>",
    ]
    assert out[3]["content"][5] == {"type": "image"}
    # an existing system turn is extended, not replaced
    out = prompt_messages(
        [{"role": "system", "content": "Be brief."}, *messages[:1]], [ADD], HERMES
    )
    assert out[0]["content"].startswith("Be brief.\n\nYou may call")


def test_tool_calls_are_parsed_and_bad_ones_reported():
    text = (
        'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "subtract", "arguments": {}}</tool_call>'
        "<tool_call>{not json</tool_call>"
        '<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'  # unterminated
    )
    content, calls, invalid = HERMES.parse(text, [ADD, WEATHER])
    assert content == "Let me add."
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("weather", {"city": "Oslo"}),
    ]
    assert [(c.name, c.error.split(":")[0]) for c in invalid] == [
        ("subtract", "unknown tool 'subtract'"),
        (None, "not JSON"),
    ]
    assert len({c.id for c in calls + invalid}) == 4
    assert HERMES.parse("no calls here ", [ADD]) == ("no calls here ", [], [])


def test_bad_tools_and_placeholders_in_tool_calls_are_refused(tiny_vlm):
    with pytest.raises(InvalidInputError, match="OpenAI function definition"):
        tiny_vlm.generate_batch([GuardRequest("hi", tools=[{"name": "add"}])])
    with pytest.raises(InvalidInputError, match="unique"):
        tiny_vlm.generate_batch([GuardRequest("hi", tools=[ADD, ADD])])
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": "<image>"}}}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    with pytest.raises(InvalidInputError, match="placeholder"):
        tiny_vlm.generate_batch([GuardRequest(history, tools=[ADD])])


def test_a_template_that_takes_tools_renders_them_itself(tiny_vlm):
    processor = tiny_vlm.backend.processor
    native = GuardedVLM.from_model(tiny_vlm.backend.model, _with_template(processor))
    assert native.backend.takes_tools and not tiny_vlm.backend.takes_tools
    from guardrail.requests import render_request

    request = GuardRequest("3+4?", tools=[ADD])
    ids = native.encode([render_request(request)])["input_ids"][0]
    prompt = native.tokenizer.decode(ids)
    assert prompt.startswith("<|im_start|>system\nTOOLS:" + json.dumps(ADD))
    assert "You may call" not in prompt  # the documented format is for other templates
    ours = tiny_vlm.tokenizer.decode(tiny_vlm.encode([render_request(request)])["input_ids"][0])
    assert "You may call one or more functions" in ours


def _with_template(processor):
    import copy

    clone = copy.copy(processor)
    clone.chat_template = TOOLS_TEMPLATE
    return clone


# ---------------------------------------------------------------- constrained decoding


def test_a_required_tool_call_is_schema_valid_even_from_a_random_model(tiny_vlm, image):
    tools = [WEATHER, PING]
    requests = [
        GuardRequest(
            "Weather?", [image], tools=tools, constraint=OutputConstraint.tool_call(tools)
        ),
        GuardRequest(
            "Weather?",
            [image],
            tools=tools,
            constraint=OutputConstraint.tool_call(tools, "weather"),
            mode="sample",
        ),
        GuardRequest("Weather?", [image], tools=tools, mode="sample"),
    ]
    outputs = tiny_vlm.generate_batch(requests, max_new_tokens=80)
    for out in outputs[:2]:
        assert out.finish_reason == "tool_calls" and not out.invalid_tool_calls
        (call,) = out.tool_calls
        if call.name == "weather":
            assert list(call.arguments) == ["city"] and call.arguments["city"] in ("Paris", "Oslo")
        else:
            assert (call.name, call.arguments) == ("ping", {})
    assert outputs[1].tool_calls[0].name == "weather"
    # the unconstrained row in the same batch is a random model's babble, not a tool call,
    # and the same as when it runs alone
    assert not outputs[2].tool_calls and outputs[2].finish_reason != "tool_calls"
    alone = tiny_vlm.generate_batch([requests[2]], max_new_tokens=80)[0]
    assert alone.token_ids == outputs[2].token_ids


def test_json_constraints_hold_to_their_schema(tiny_vlm, image):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "enum": [7, 31]},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    out = tiny_vlm.generate_batch(
        [
            GuardRequest("Who?", [image], constraint=OutputConstraint.json_schema(schema)),
        ],
        max_new_tokens=60,
    )
    data = json.loads(out[0].text)
    assert data["age"] in (7, 31) and len(data["name"]) <= 6
    assert list(data) == ["name", "age"] and isinstance(data["age"], int)
    assert out[0].finish_reason == "stop"


def test_json_mode_gives_a_json_object(smollm_vlm):
    constraint = OutputConstraint.any_json()
    out = smollm_vlm.generate_batch(
        [GuardRequest("Give the capital of France as JSON.", constraint=constraint)],
        max_new_tokens=40,
    )[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


def test_tools_and_constraints_keep_the_sample_level_invariant(smollm_vlm):
    """Tools are in the request row and both reference rows, and only the request row is
    constrained: an input image equal to the corruption image, corrected at the last layer,
    gives back the text-only answer token for token, tool call included."""
    vlm = smollm_vlm.with_config(GuardConfig(layers=(-1,), alpha=1.0, mode="sample"))
    blank = corruption_image(vlm.config.corruption, (200, 150))
    prompt = "What is 12 plus 30? Use the add tool."
    constraint = OutputConstraint.tool_call([ADD])
    text = vlm.generate_batch(
        [GuardRequest(prompt, tools=[ADD], constraint=constraint)], max_new_tokens=48
    )[0]
    guarded = vlm.generate_batch(
        [GuardRequest(prompt, [blank], tools=[ADD], constraint=constraint)], max_new_tokens=48
    )[0]
    assert guarded.decision.mode_used == "sample"
    assert guarded.token_ids == text.token_ids and guarded.tool_calls[0].name == "add"
    with_tools_text, with_tools_guarded = (
        vlm.next_token_logits([GuardRequest(prompt, tools=[ADD])])[0],
        vlm.next_token_logits([GuardRequest(prompt, [blank], tools=[ADD])])[0],
    )
    without_tools_text = vlm.next_token_logits([GuardRequest(prompt)])[0]
    assert (with_tools_guarded - with_tools_text).abs().max() < 1e-3
    assert (with_tools_text - without_tools_text).abs().max() > 1.0  # the tools were there
    assert torch.isfinite(with_tools_guarded).all()
