"""Storage of shift vectors: tensors, metadata and stores; nothing of models."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from shift_store.base import (
    ShiftKey,
    ShiftStore,
    StoredShift,
    StoreError,
    StoreUnavailableError,
)
from shift_store.cache import CachedShiftSource, Lookup
from shift_store.local import LocalShiftStore
from shift_store.vector import (
    FORMAT_VERSION,
    ModelFingerprint,
    ShiftFormatError,
    ShiftMeta,
    ShiftSignatureError,
    ShiftVector,
)

_OWN_PARAMS = {"namespace", "ttl", "retries", "key_env"}


def open_store(
    url: str | None = None, namespace: str = "default", signing_key: bytes | None = None
) -> ShiftStore:
    """Open a store from a URL; ``namespace`` applies unless the URL names one.

    With a signing key (``signing_key``, or the URL parameter ``key_env`` naming an environment
    variable that holds it), vectors are signed with HMAC-SHA256 on put, and a vector that is
    unsigned or signed with another key is refused on every get.

    * ``None`` - a :class:`LocalShiftStore` in the user cache folder (the embedded default);
    * ``file:///path`` - a :class:`LocalShiftStore` in ``/path``;
    * ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock`` - a
      :class:`RedisShiftStore`. Query parameters: ``namespace``, ``ttl`` (seconds), ``retries``,
      and redis-py's own (``socket_timeout``, ``socket_connect_timeout``, ``max_connections``...).
    """
    if url is None:
        return LocalShiftStore(namespace=namespace, signing_key=signing_key)
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    namespace = params.get("namespace", namespace)
    if "key_env" in params:
        signing_key = _key_from_env(params["key_env"])
    if parts.scheme == "file":
        return LocalShiftStore(parts.path, namespace=namespace, signing_key=signing_key)
    if parts.scheme in ("redis", "rediss", "unix"):
        from shift_store.redis_store import RedisShiftStore, make_client

        rest = urlencode({k: v for k, v in params.items() if k not in _OWN_PARAMS})
        client = make_client(
            urlunsplit(parts._replace(query=rest)), retries=int(params.get("retries", 2))
        )
        ttl = int(params["ttl"]) if "ttl" in params else None
        return RedisShiftStore(client, namespace=namespace, ttl_s=ttl, signing_key=signing_key)
    raise ValueError(f"unsupported shift store URL scheme {parts.scheme!r} in {url!r}")


def _key_from_env(name: str) -> bytes:
    value = os.environ.get(name)
    if not value:
        raise StoreError(f"the shift signing key variable {name} is not set (key_env={name})")
    return value.encode()


__all__ = [
    "FORMAT_VERSION",
    "CachedShiftSource",
    "LocalShiftStore",
    "Lookup",
    "ModelFingerprint",
    "ShiftFormatError",
    "ShiftKey",
    "ShiftMeta",
    "ShiftSignatureError",
    "ShiftStore",
    "ShiftVector",
    "StoreError",
    "StoreUnavailableError",
    "StoredShift",
    "open_store",
]
