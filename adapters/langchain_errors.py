"""The engine's typed errors as LangChain's provider-neutral exceptions too, so that agents and
retry middleware treat them like any provider's (as langchain-openai maps its errors). Each
raised error is an instance of its own guard class *and* of the matching LangChain class, with
its decision record still attached."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from langchain_core.exceptions import (
    ModelAPIError,
    ModelError,
    ModelInvalidRequestError,
    ModelRateLimitError,
)

from guardrail.errors import (
    GuardrailError,
    GuardUnavailableError,
    InvalidInputError,
    OverloadedError,
)

# First match wins: the guard class, and the LangChain class it also becomes.
_MAPPING: tuple[tuple[type[GuardrailError], type[ModelError]], ...] = (
    (InvalidInputError, ModelInvalidRequestError),  # bad input: retrying will not help
    (OverloadedError, ModelRateLimitError),  # too many calls for the app: retry later
    (GuardUnavailableError, ModelAPIError),  # failing closed (store down...): retryable
    (GuardrailError, ModelError),
)


@functools.cache
def _dual(cls: type[GuardrailError]) -> type[GuardrailError]:
    base = next(lc for guard, lc in _MAPPING if issubclass(cls, guard))
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__})


def as_langchain(error: GuardrailError) -> GuardrailError:
    """``error`` as an instance of its class and of LangChain's matching exception."""
    if isinstance(error, ModelError):
        return error
    dual = _dual(type(error))  # type: ignore[arg-type]  # classes are hashable
    converted = dual.__new__(dual)
    converted.__dict__.update(error.__dict__)
    converted.args = error.args
    converted.__cause__ = error.__cause__
    return converted


@contextmanager
def langchain_errors() -> Iterator[None]:
    """Re-raise guard errors from the body as :func:`as_langchain` makes them."""
    try:
        yield
    except GuardrailError as e:
        raise as_langchain(e) from e.__cause__
