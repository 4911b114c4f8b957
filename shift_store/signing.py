"""Signing as one wrapper around any store: vectors are signed with HMAC-SHA256 on put, bound to
their entry (namespace and key: model, corruption, position, anchor set, format), and a vector
that is unsigned, signed with another key or signed for another entry is refused on every
get."""

from __future__ import annotations

from contextlib import AbstractContextManager

from shift_store.base import ShiftKey, ShiftStore, StoredShift
from shift_store.vector import ShiftVector


class SignedStore:
    """``inner`` with signatures under ``key`` (see the module docstring)."""

    signed = True

    def __init__(self, inner: ShiftStore, key: bytes) -> None:
        self.inner, self._key = inner, key
        self.namespace = inner.namespace

    def __repr__(self) -> str:
        return f"SignedStore({self.inner!r})"

    def get(self, key: ShiftKey) -> tuple[ShiftVector, str] | None:
        found = self.inner.get(key)
        if found is not None:
            found[0].verify(self._key, self._entry(key))
        return found

    def put(self, key: ShiftKey, vector: ShiftVector) -> str:
        return self.inner.put(key, vector.signed(self._key, self._entry(key)))

    def _entry(self, key: ShiftKey) -> str:
        return f"{self.namespace}/{key.name}"

    def version(self, key: ShiftKey) -> str | None:
        return self.inner.version(key)

    def delete(self, key: ShiftKey) -> bool:
        return self.inner.delete(key)

    def list(self) -> list[StoredShift]:
        return self.inner.list()

    def lock(
        self, key: ShiftKey, timeout_s: float, expire_s: float
    ) -> AbstractContextManager[bool]:
        return self.inner.lock(key, timeout_s, expire_s)
