"""RedisShiftStore: vectors shared by every replica through one Redis server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import SplitResult, urlencode, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from shift_store import base
from shift_store.base import ShiftKey, StoredShift, StoreUnavailableError
from shift_store.errors import check_namespace
from shift_store.vector import ShiftFormatError, ShiftMeta, ShiftVector

log = logging.getLogger("shift_store")


def make_client(
    url: str,
    *,
    retries: int = 2,
    socket_timeout: float = 1.0,
    connect_timeout: float = 1.0,
    max_connections: int = 16,
    **kwargs: Any,
) -> redis.Redis:
    """A redis-py client for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs, with bounded
    timeouts and retries with jittered exponential backoff. Query parameters of the URL (for
    example ``socket_timeout``) override the keyword defaults."""
    retry = Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=0.5),
        retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError),
    )
    options = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        **kwargs,
    }
    return redis.Redis.from_url(url, retry=retry, decode_responses=False, **options)


# One round trip, atomically: the payload's size first, and the payload only within the cap
# (a writer could otherwise make every reader fetch and hold a field of any size).
_BOUNDED_GET = """
local size = redis.call('HSTRLEN', KEYS[1], 'payload')
if size > tonumber(ARGV[1]) then return {size} end
return {size, redis.call('HGET', KEYS[1], 'payload'), redis.call('HGET', KEYS[1], 'sha256')}
"""


class RedisShiftStore:
    """Each vector is one Redis hash ``cmrm:<namespace>:shift:<key>`` with fields ``payload``
    (safetensors bytes, metadata inside), ``meta`` (JSON, for listing) and ``sha256`` (the
    version), written in one ``HSET`` so that no reader ever sees half a vector."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "default",
        ttl_s: int | None = None,
    ) -> None:
        self.client = client
        self.namespace = check_namespace(namespace)
        self.ttl_s = ttl_s
        self.signed = False
        self._prefix = f"cmrm:{namespace}:"

    def __repr__(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"RedisShiftStore({where!r}, namespace={self.namespace!r})"

    def redis_key(self, key: ShiftKey) -> str:
        """The name of the Redis hash that holds ``key`` (for operators and tests)."""
        return f"{self._prefix}shift:{key.name}"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise StoreUnavailableError(f"redis unreachable during {what}: {e}") from e
        except RedisError as e:
            raise StoreUnavailableError(f"redis error during {what}: {e}") from e

    def version(self, key: ShiftKey) -> str | None:
        value = self._call("version", self.client.hget, self.redis_key(key), "sha256")
        return _text(value, self.redis_key(key)) if value else None

    def get(self, key: ShiftKey) -> tuple[ShiftVector, str] | None:
        name = self.redis_key(key)
        fields = self._call("get", self.client.eval, _BOUNDED_GET, 1, name, base.MAX_ENTRY_BYTES)
        if len(fields) == 1:  # over the cap: not fetched
            log.warning("rejected shift under %s: %d bytes", name, fields[0])
            size, cap = int(fields[0]), base.MAX_ENTRY_BYTES
            raise ShiftFormatError(f"stored payload has {size:,} bytes, over the {cap:,}-byte cap")
        _, payload, version = fields
        if not payload:
            return None
        try:
            vector = ShiftVector.from_bytes(payload)
        except ShiftFormatError as e:
            log.warning("rejected shift under %s: %s", self.redis_key(key), e)
            raise
        if version is None or vector.checksum != _text(version, self.redis_key(key)):
            log.warning("rejected shift under %s: version does not match", self.redis_key(key))
            raise ShiftFormatError("stored version does not match the payload checksum")
        return vector, vector.checksum

    def put(self, key: ShiftKey, vector: ShiftVector) -> str:
        name = self.redis_key(key)
        mapping: dict[bytes | bytearray | memoryview | str | int | float, bytes | str] = {
            "payload": vector.to_bytes(),
            "meta": vector.meta.model_dump_json(),
            "sha256": vector.checksum,
        }
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(name)  # drop fields of an older writer, in the same transaction
            pipe.hset(name, mapping=mapping)
            if self.ttl_s:
                pipe.expire(name, self.ttl_s)
            self._call("put", pipe.execute)
        return vector.checksum

    def delete(self, key: ShiftKey) -> bool:
        return bool(self._call("delete", self.client.delete, self.redis_key(key)))

    def list(self) -> list[StoredShift]:
        entries = []
        pattern = f"{self._prefix}shift:*"
        for name in self._call("list", lambda: list(self.client.scan_iter(pattern, count=100))):
            meta, version = self._call("list", self.client.hmget, name, ["meta", "sha256"])
            try:
                entry = StoredShift(
                    key=name.decode().removeprefix(f"{self._prefix}shift:"),
                    meta=ShiftMeta.model_validate_json(meta or b""),
                    version=(version or b"").decode(),
                )
            except ValueError as e:
                log.warning("unreadable shift metadata under %s: %s", name, e)
                continue
            entries.append(entry)
        return sorted(entries, key=lambda e: e.key)

    @contextmanager
    def lock(self, key: ShiftKey, timeout_s: float, expire_s: float = 600.0) -> Iterator[bool]:
        lock = self.client.lock(
            f"{self._prefix}lock:{key.name}",
            timeout=expire_s,
            blocking_timeout=timeout_s,
            sleep=0.05,
        )
        acquired = self._call("lock", lock.acquire)
        try:
            yield acquired
        finally:
            if acquired:
                try:
                    lock.release()
                except (LockError, RedisError) as e:  # expired, or the server went away
                    log.warning("could not release shift lock %s: %s", key.name, e)


def _text(value: bytes, where: str) -> str:
    """A stored text field; a damaged one is a format error of that entry, never a crash."""
    try:
        return value.decode("ascii")
    except UnicodeDecodeError as e:
        raise ShiftFormatError(f"damaged version field under {where}: {e}") from e


_OWN_PARAMS = {"namespace", "ttl", "retries", "key_env"}


def open_url(url: SplitResult, params: dict[str, str], namespace: str) -> RedisShiftStore:
    """``redis://``, ``rediss://``, ``unix://``: the Redis schemes' opener (``ttl`` and
    ``retries`` are ours, the other query parameters redis-py's)."""
    rest = urlencode({k: v for k, v in params.items() if k not in _OWN_PARAMS})
    client = make_client(
        urlunsplit(url._replace(query=rest)), retries=int(params.get("retries", 2))
    )
    ttl = int(params["ttl"]) if "ttl" in params else None
    return RedisShiftStore(client, namespace=namespace, ttl_s=ttl)
