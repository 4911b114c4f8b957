"""Tools and structured output for the LangChain chat model: ``bind_tools`` and
``with_structured_output``, both held to their schema by the engine's constrained decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel

from adapters.conversation import tool_choice_value

StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]


class ToolBinding(BaseChatModel):
    """``bind_tools`` and ``with_structured_output`` for a chat model whose calls take
    ``tools``, ``tool_choice`` and ``response_format`` as the engine's constraints."""

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model. ``tool_choice``: ``"auto"`` (default), ``"none"``,
        ``"any"``/``"required"``/``True`` (some tool must be called) or a tool's name; the last
        two are enforced by constrained decoding."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = tool_choice_value(tool_choice, formatted)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(  # type: ignore[override,unused-ignore]
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict, JSON schema or OpenAI
        tool). ``json_schema`` (default) holds the answer to the schema by constrained
        decoding; ``function_calling`` forces a call to a tool named after the schema;
        ``json_mode`` holds it to any JSON object."""
        if method == "function_calling":
            return super().with_structured_output(schema or {}, include_raw=include_raw, **kwargs)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            if pydantic
            else JsonOutputParser()
        )
        if method == "json_mode":
            response_format: dict[str, Any] = {"type": "json_object"}
        elif schema is None:
            raise ValueError("method='json_schema' needs a schema")
        else:
            json_schema = convert_to_json_schema(schema)  # pydantic (v1 or v2), TypedDict...
            response_format = {"type": "json_schema", "json_schema": {"schema": json_schema}}
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks(
            [unparsed], exception_key="parsing_error"
        )
