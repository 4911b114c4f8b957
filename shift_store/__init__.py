"""Storage of shift vectors: tensors, metadata and stores; nothing of models."""

from __future__ import annotations

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
    ShiftVector,
)

_OWN_PARAMS = {"namespace", "ttl", "retries"}


def open_store(url: str | None = None, namespace: str = "default") -> ShiftStore:
    """Open a store from a URL; ``namespace`` applies unless the URL names one.

    * ``None`` - a :class:`LocalShiftStore` in the user cache folder (the embedded default);
    * ``file:///path`` - a :class:`LocalShiftStore` in ``/path``;
    * ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock`` - a
      :class:`RedisShiftStore`. Query parameters: ``namespace``, ``ttl`` (seconds), ``retries``,
      and redis-py's own (``socket_timeout``, ``socket_connect_timeout``, ``max_connections``...).
    """
    if url is None:
        return LocalShiftStore(namespace=namespace)
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    namespace = params.get("namespace", namespace)
    if parts.scheme == "file":
        return LocalShiftStore(parts.path, namespace=namespace)
    if parts.scheme in ("redis", "rediss", "unix"):
        from shift_store.redis_store import RedisShiftStore, make_client

        rest = urlencode({k: v for k, v in params.items() if k not in _OWN_PARAMS})
        client = make_client(
            urlunsplit(parts._replace(query=rest)), retries=int(params.get("retries", 2))
        )
        ttl = int(params["ttl"]) if "ttl" in params else None
        return RedisShiftStore(client, namespace=namespace, ttl_s=ttl)
    raise ValueError(f"unsupported shift store URL scheme {parts.scheme!r} in {url!r}")


__all__ = [
    "FORMAT_VERSION",
    "CachedShiftSource",
    "LocalShiftStore",
    "Lookup",
    "ModelFingerprint",
    "ShiftFormatError",
    "ShiftKey",
    "ShiftMeta",
    "ShiftStore",
    "ShiftVector",
    "StoreError",
    "StoreUnavailableError",
    "StoredShift",
    "open_store",
]
