"""Extension points used from outside the packages: a store URL scheme and a tool-call format
registered by the caller, signing as a wrapper around any store, and the built-in formats."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar

import pytest

from guardrail import GuardConfig, GuardedVLM, GuardRequest
from guardrail.constraints import OutputConstraint
from guardrail.testing import fixture_path, function_tool
from guardrail.tool_formats import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    TOOL_FORMATS,
    ToolCallFormat,
    register_tool_format,
)
from shift_store import (
    ShiftFormatError,
    ShiftSignatureError,
    SignedStore,
    StoredShift,
    StoreError,
    open_store,
    register_store_scheme,
)

ADD = function_tool("add", "Add two integers.", a="integer", b="integer")
SWITCH = function_tool("switch", "Turn the light on or off.", on="boolean")  # bounded answers
ANCHORS = ["What is in this picture?", "How do I open a locked door?", "Tell me about cats."]


class MemoryStore:
    """A store of the caller's own: a dict, shared per URL host."""

    signed = False
    shelves: ClassVar[dict[str, dict]] = {}

    def __init__(self, host: str, namespace: str) -> None:
        self.namespace = namespace
        self.items = self.shelves.setdefault(f"{host}/{namespace}", {})

    def get(self, key):
        return self.items.get(key.name)

    def version(self, key):
        found = self.items.get(key.name)
        return found[1] if found else None

    def put(self, key, vector):
        self.items[key.name] = (vector, vector.checksum)
        return vector.checksum

    def delete(self, key):
        return self.items.pop(key.name, None) is not None

    def list(self):
        return [StoredShift(key=k, meta=v.meta, version=s) for k, (v, s) in self.items.items()]

    @contextmanager
    def lock(self, key, timeout_s, expire_s=0.0):
        yield True


register_store_scheme("memory", lambda url, params, ns: MemoryStore(url.netloc, ns))


def test_a_registered_store_scheme_serves_the_engine(tiny_vlm, image):
    lookup = tiny_vlm.with_config(GuardConfig()).use_store(
        "memory://shelf?namespace=app", anchors=ANCHORS, anchor_name="three"
    )
    assert lookup.vector is not None and lookup.verified is False
    assert len(MemoryStore.shelves["shelf/app"]) == 1  # computed once, stored there
    again = GuardedVLM(tiny_vlm.backend, GuardConfig())
    again.use_store(
        open_store("memory://shelf", namespace="app"), anchor_name="three", compute_on_miss=False
    )
    out = again.generate("What is it?", [image], max_new_tokens=2)
    assert out.decision.mode_used == "dataset" and out.decision.shift_key is not None
    with pytest.raises(ValueError, match="unsupported shift store URL scheme 'nowhere'"):
        open_store("nowhere://x")


def test_signing_wraps_any_store_and_refuses_foreign_or_unsigned_vectors(tiny_vlm):
    shift = tiny_vlm.compute_dataset_shift(ANCHORS, progress=False, activate=False)
    from shift_store import ShiftKey

    key = ShiftKey.for_meta(shift.meta)
    signed = open_store("memory://vault", signing_key=b"deployment key")
    assert isinstance(signed, SignedStore) and signed.signed
    signed.put(key, shift)
    assert signed.get(key)[0].signature is not None  # verified on the way out
    plain = open_store("memory://vault")
    assert plain.get(key)[0].signature is not None  # stored signed
    plain.put(key, shift)  # an unsigned vector over the entry
    with pytest.raises(ShiftSignatureError, match="unsigned"):
        signed.get(key)
    open_store("memory://vault", signing_key=b"another key").put(key, shift)
    with pytest.raises(ShiftSignatureError, match="does not match"):
        signed.get(key)
    assert issubclass(ShiftFormatError, StoreError)  # one except clause covers store trouble


def test_each_built_in_format_writes_and_parses_its_own_calls():
    for fmt, answer in (
        (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
        (LLAMA3_JSON, '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
        (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ):
        assert fmt.write("add", {"a": 1, "b": 2}) == answer
        content, calls, invalid = fmt.parse(f"Sure. {answer}", [ADD])
        assert (content, [(c.name, c.arguments) for c in calls], invalid) == (
            "Sure.",
            [("add", {"a": 1, "b": 2})],
            [],
        ), fmt.name
    two = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "mul", "arguments": {}}]'
    _, calls, invalid = MISTRAL.parse(two, [ADD])
    assert [c.name for c in calls] == ["add"] and invalid[0].name == "mul"
    _, calls, _ = LLAMA3_JSON.parse(
        '{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"b": 2}}', [ADD]
    )
    assert [c.arguments for c in calls] == [{"a": 1}, {"b": 2}]


def test_mllama_answers_forced_tool_calls_in_llama3_json():
    vlm = GuardedVLM.from_pretrained(str(fixture_path("tiny-mllama")))
    assert vlm.backend.tool_format is LLAMA3_JSON
    constraint = OutputConstraint.tool_call([SWITCH])
    out = vlm.generate_batch(
        [GuardRequest("Turn the light on.", tools=[SWITCH], constraint=constraint)],
        max_new_tokens=60,
    )[0]
    assert out.text.startswith('{"name": "switch", "parameters": {"on": ')
    assert [c.name for c in out.tool_calls] == ["switch"] and out.finish_reason == "tool_calls"


def test_a_registered_format_is_rendered_constrained_and_parsed(tiny_vlm):
    angle = ToolCallFormat(
        name="angle-test",
        marker="<<call>>",
        prefix="<<call>>",
        suffix="<</call>>",
        close="<</call>>",
        arguments_key="args",
        instructions="Tools:\n{tools}\nCall one as <<call>>{...}<</call>>.",
    )
    register_tool_format(angle)
    assert TOOL_FORMATS["angle-test"] is angle
    family = replace(tiny_vlm.family, tool_call_format="angle-test")
    vlm = GuardedVLM.from_model(tiny_vlm.model, tiny_vlm.processor, family=family)
    prompt = vlm.tokenizer.decode(
        vlm.encode([vlm.plan(GuardRequest("Turn the light on.", tools=[SWITCH]))[0]])["input_ids"][
            0
        ]
    )
    assert "Tools:" in prompt and '"name": "switch"' in prompt
    constraint = OutputConstraint.tool_call([SWITCH])
    out = vlm.generate_batch(
        [GuardRequest("Turn the light on.", tools=[SWITCH], constraint=constraint)],
        max_new_tokens=60,
    )[0]
    assert out.text.startswith('<<call>>{"name": "switch", "args": {"on": ')
    assert out.text.endswith("<</call>>") and out.finish_reason == "tool_calls"
    assert [c.name for c in out.tool_calls] == ["switch"] and out.content == ""
    assert (
        json.loads(out.text.removeprefix("<<call>>").removesuffix("<</call>>"))["name"] == "switch"
    )
