"""The shift store's typed errors."""

from __future__ import annotations

import re


class StoreError(Exception):
    """Base class of shift store errors."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store cannot be reached (server down, timeout, permission denied)."""


class InvalidNamespaceError(StoreError, ValueError):
    """A namespace that could name another place (a path, a Redis key separator)."""


_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def check_namespace(namespace: str) -> str:
    """``namespace`` if it names one place and nothing else: letters, digits and ``._@+-``,
    1-128 characters, starting with a letter or digit (no ``/``, ``..``, ``:`` or spaces)."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidNamespaceError(
            f"store namespace {namespace!r} is not allowed: use letters, digits and ._@+- "
            "(1-128 characters, starting with a letter or digit)"
        )
    return namespace
