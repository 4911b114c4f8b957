"""LangChain's own standard test suites for chat models, on the tiny fixture."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import httpx
import pytest
from langchain_core.exceptions import OutputParserException
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from adapters.langchain import ChatGuardedVLM
from adapters.remote_images import RemoteImageFetcher
from guardrail.testing import fixture_path, synthetic_image

# A fixed place: test_serdes compares the serialized settings with a committed snapshot.
_STORE = Path(tempfile.gettempdir()) / "cmrm-standard-store"
CAPABLE = "needs a capable model"
ON_REAL_WEIGHTS = " (passes on the SmolLM2 fixture: the *_real_weights tests below)"
# Pydantic validates the fields, which a random model leaves unfinished: that case fails with
# a parsing error (and only with one); the typeddict and json_schema cases pass (XPASS).
SCHEMA_TYPES = [
    pytest.param(
        "pydantic",
        marks=pytest.mark.xfail(
            reason=CAPABLE + ": pydantic needs free-text fields ended",
            raises=OutputParserException,
            strict=True,
        ),
    ),
    "typeddict",
    "json_schema",
]
# Overridden only to mark one parameter xfail; the method-level mark (condition False) never
# applies, it tells langchain-tests' override check why the test is overridden.
NARROWED = pytest.mark.xfail(False, reason="overridden to mark only the pydantic case xfail")
# The picture that test_image_inputs and test_image_tool_message download.
LANGCHAIN_PICTURE = (
    "https://raw.githubusercontent.com/langchain-ai/docs/"
    "4d11d08b6b0e210bd456943f7a22febbd168b543/src/images/agentic-rag-output.png"
)


@pytest.fixture
def offline_picture(monkeypatch):
    """The standard tests' picture, served from here: their download, and the chat model's
    fetch of that one URL (every other URL goes through the fetcher as usual)."""
    buffer = io.BytesIO()
    synthetic_image(7, (320, 240)).save(buffer, format="PNG")
    picture = buffer.getvalue()

    def download(url, **kwargs):
        assert url == LANGCHAIN_PICTURE
        return httpx.Response(200, content=picture, request=httpx.Request("GET", url))

    fetch = RemoteImageFetcher.fetch
    monkeypatch.setattr(httpx, "get", download)
    monkeypatch.setattr(
        RemoteImageFetcher,
        "fetch",
        lambda self, url: picture if url == LANGCHAIN_PICTURE else fetch(self, url),
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
    @pytest.mark.xfail(
        reason="load(allowed_objects='all') admits only the classes of langchain-core's own "
        "allowlist; loads(..., allowed_objects=[ChatGuardedVLM]) round-trips (test_adapter)",
        raises=ValueError,
        strict=True,
    )
    def test_serdes(self, model, snapshot) -> None:
        super().test_serdes(model, snapshot)


class TestChatGuardedVLMIntegration(_Params, ChatModelIntegrationTests):
    # test_image_inputs and test_image_tool_message download a picture from the internet,
    # which this workplace cannot reach: `offline_picture` serves it locally (not overridden).
    pytestmark = pytest.mark.usefixtures("offline_picture")

    # The tiny fixture is a random model. Constrained decoding makes its tool calls and JSON
    # well-formed, but it cannot pick a right argument value, end a free-text string within
    # max_tokens, or choose to call a tool unforced: these tests need a capable model.

    @pytest.mark.xfail(
        reason=CAPABLE + ": checks the argument value (input=3)" + ON_REAL_WEIGHTS, strict=True
    )
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(
        reason=CAPABLE + ": checks the argument value (input=3)" + ON_REAL_WEIGHTS, strict=True
    )
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(
        reason=CAPABLE + ": must end a free-text argument" + ON_REAL_WEIGHTS, strict=True
    )
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @NARROWED
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @NARROWED
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
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

    @pytest.mark.xfail(
        reason=CAPABLE + ": must end a free-text argument" + ON_REAL_WEIGHTS, strict=True
    )
    def test_unicode_tool_call_integration(self, model, tool_choice=None, force_tool_call=True):
        super().test_unicode_tool_call_integration(model, tool_choice, force_tool_call)


class _SmolLM2Suite(_Params, ChatModelIntegrationTests):
    """The same suite on the SmolLM2 fixture (real weights), for the tool-calling tests that a
    random model cannot pass: not collected whole (it would take minutes), only those below."""

    __test__ = False

    @property
    def chat_model_params(self) -> dict:
        return {**super().chat_model_params, "model": str(fixture_path("smollm"))}


@pytest.fixture(scope="module")
def smollm_suite(smollm_path):
    suite = _SmolLM2Suite()
    return suite, suite.chat_model_class(**suite.chat_model_params)


@pytest.mark.parametrize(
    "name",
    ["test_tool_calling", "test_bind_runnables_as_tools", "test_unicode_tool_call_integration"],
)
def test_tool_calling_standard_tests_pass_on_real_weights(smollm_suite, name):
    suite, model = smollm_suite
    getattr(suite, name)(model)


async def test_tool_calling_async_passes_on_real_weights(smollm_suite):
    suite, model = smollm_suite
    await suite.test_tool_calling_async(model)
