"""Storage of shift vectors: tensors, metadata and stores; nothing of models."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import entry_points
from urllib.parse import SplitResult, parse_qsl, urlsplit

from shift_store.base import (
    ShiftKey,
    ShiftStore,
    StoredShift,
    StoreError,
    StoreUnavailableError,
)
from shift_store.cache import CachedShiftSource, Lookup
from shift_store.errors import InvalidNamespaceError
from shift_store.local import LocalShiftStore
from shift_store.local import open_url as local_url
from shift_store.signing import SignedStore
from shift_store.vector import (
    FORMAT_VERSION,
    ModelFingerprint,
    ShiftFormatError,
    ShiftMeta,
    ShiftSignatureError,
    ShiftVector,
)

# Opens a store from its URL's parts: (parsed URL, query parameters, namespace) -> store.
StoreOpener = Callable[[SplitResult, dict[str, str], str], ShiftStore]
STORE_SCHEMES_GROUP = "cmrm_guardrail.stores"
_OPENERS: dict[str, StoreOpener] = {}


def register_store_scheme(scheme: str, opener: StoreOpener) -> None:
    """Open URLs of ``scheme`` with ``opener`` (packages register theirs as entry points of the
    ``cmrm_guardrail.stores`` group, named after the scheme)."""
    _OPENERS[scheme] = opener


def _opener(scheme: str) -> StoreOpener:
    if scheme not in _OPENERS:
        for point in entry_points(group=STORE_SCHEMES_GROUP, name=scheme):
            _OPENERS[scheme] = point.load()
    if scheme not in _OPENERS:
        known = sorted({*_OPENERS, *(p.name for p in entry_points(group=STORE_SCHEMES_GROUP))})
        raise ValueError(f"unsupported shift store URL scheme {scheme!r}; known: {known}")
    return _OPENERS[scheme]


def _redis(url: SplitResult, params: dict[str, str], namespace: str) -> ShiftStore:
    from shift_store.redis_store import open_url  # redis-py loads only when used

    return open_url(url, params, namespace)


for _scheme, _open in (
    ("file", local_url),
    ("redis", _redis),
    ("rediss", _redis),
    ("unix", _redis),
):
    register_store_scheme(_scheme, _open)


def open_store(
    url: str | None = None, namespace: str = "default", signing_key: bytes | None = None
) -> ShiftStore:
    """Open a store from a URL; ``namespace`` applies unless the URL names one.

    With a signing key (``signing_key``, or the URL parameter ``key_env`` naming an environment
    variable that holds it), the store is wrapped in a :class:`SignedStore`.

    * ``None`` - a :class:`LocalShiftStore` in the user cache folder (the embedded default);
    * ``file:///path`` - a :class:`LocalShiftStore` in ``/path``;
    * ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock`` - a
      :class:`RedisShiftStore`. Query parameters: ``namespace``, ``ttl`` (seconds), ``retries``,
      and redis-py's own (``socket_timeout``, ``socket_connect_timeout``, ``max_connections``...);
    * any other scheme registered with :func:`register_store_scheme` or an entry point.
    """
    params: dict[str, str] = {}
    if url is None:
        store: ShiftStore = LocalShiftStore(namespace=namespace)
    else:
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query))
        opened = _opener(parts.scheme)(parts, params, params.get("namespace", namespace))
        store = opened
    if "key_env" in params:
        signing_key = _key_from_env(params["key_env"])
    return store if signing_key is None else SignedStore(store, signing_key)


def _key_from_env(name: str) -> bytes:
    value = os.environ.get(name)
    if not value:
        raise StoreError(f"the shift signing key variable {name} is not set (key_env={name})")
    return value.encode()


__all__ = [
    "FORMAT_VERSION",
    "CachedShiftSource",
    "InvalidNamespaceError",
    "LocalShiftStore",
    "Lookup",
    "ModelFingerprint",
    "ShiftFormatError",
    "ShiftKey",
    "ShiftMeta",
    "ShiftSignatureError",
    "ShiftStore",
    "ShiftVector",
    "SignedStore",
    "StoreError",
    "StoreUnavailableError",
    "StoredShift",
    "open_store",
    "register_store_scheme",
]
