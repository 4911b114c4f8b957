"""LangChain's own standard test suites for chat models, on the tiny fixture."""

from __future__ import annotations

import tempfile

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from adapters.langchain import ChatGuardedVLM
from guardrail.testing import fixture_path

_STORE = tempfile.mkdtemp(prefix="cmrm-standard-")
CAPABLE = "needs a capable model"
# Pydantic validates the fields, which a random model leaves unfinished: that case fails with
# a parsing error (and only with one); the typeddict and json_schema cases pass (XPASS).
UNFINISHED_FIELDS = pytest.mark.xfail(
    reason=CAPABLE + ": pydantic needs free-text fields ended",
    raises=OutputParserException,
    strict=False,
)


class _Params:
    @property
    def chat_model_class(self) -> type[ChatGuardedVLM]:
        return ChatGuardedVLM

    @property
    def chat_model_params(self) -> dict:
        return {
            "model": str(fixture_path("tiny")),
            "app": "standard-tests",
            "store": f"file://{_STORE}",
        }

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True


class TestChatGuardedVLMUnit(_Params, ChatModelUnitTests):
    pass


class TestChatGuardedVLMIntegration(_Params, ChatModelIntegrationTests):
    @pytest.mark.xfail(
        reason="downloads a picture from the internet, which this workplace cannot "
        "reach; test_adapter.py covers the same three image formats offline",
        strict=True,
    )
    def test_image_inputs(self, model) -> None:
        super().test_image_inputs(model)

    @pytest.mark.xfail(
        reason="downloads a picture from the internet, which this workplace cannot reach; "
        "test_tools_langchain.py sends images in tool messages offline, in both formats",
        strict=True,
    )
    def test_image_tool_message(self, model) -> None:
        super().test_image_tool_message(model)

    # The tiny fixture is a random model. Constrained decoding makes its tool calls and JSON
    # well-formed, but it cannot pick a right argument value, end a free-text string within
    # max_tokens, or choose to call a tool unforced: these tests need a capable model.

    @pytest.mark.xfail(reason=CAPABLE + ": checks the argument value (input=3)", strict=True)
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=CAPABLE + ": checks the argument value (input=3)", strict=True)
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=CAPABLE + ": must end a free-text argument", strict=True)
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @UNFINISHED_FIELDS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @UNFINISHED_FIELDS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model, schema_type) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=CAPABLE + ": must end free-text fields", strict=True)
    def test_structured_output_pydantic_2_v1(self, model) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=CAPABLE + ": JSON mode does not name the fields", strict=True)
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=CAPABLE + ": must choose to call the tool", strict=True)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=CAPABLE + ": must end a free-text argument", strict=True)
    def test_unicode_tool_call_integration(self, model, tool_choice=None, force_tool_call=True):
        super().test_unicode_tool_call_integration(model, tool_choice, force_tool_call)
