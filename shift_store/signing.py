"""Signing as one wrapper around any store: vectors are signed with HMAC-SHA256 on put, bound to
their entry (namespace and key: model, corruption, position, anchor set, format), and a vector
that is unsigned, signed with another key or signed for another entry is refused on every
get. A signed calibration older than one this process has already seen under the same entry is
refused too (a replayed older calibration); across restarts that needs a pinned calibration id
(``GuardConfig.shift_calibration_id``)."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from datetime import datetime

from shift_store.base import ShiftKey, ShiftStore, StoredShift
from shift_store.vector import ShiftSignatureError, ShiftVector


class SignedStore:
    """``inner`` with signatures under ``key`` (see the module docstring)."""

    signed = True

    def __init__(self, inner: ShiftStore, key: bytes) -> None:
        self.inner, self._key = inner, key
        self.namespace = inner.namespace
        self._newest: dict[str, datetime] = {}  # per entry: the newest calibration seen
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SignedStore({self.inner!r})"

    def get(self, key: ShiftKey) -> tuple[ShiftVector, str] | None:
        found = self.inner.get(key)
        if found is not None:
            found[0].verify(self._key, self._entry(key))
            self._check_newest(key, found[0])
        return found

    def put(self, key: ShiftKey, vector: ShiftVector) -> str:
        version = self.inner.put(key, vector.signed(self._key, self._entry(key)))
        self._check_newest(key, vector)
        return version

    def _check_newest(self, key: ShiftKey, vector: ShiftVector) -> None:
        entry, created = self._entry(key), vector.meta.created_at
        with self._lock:
            newest = self._newest.get(entry)
            if newest is not None and created < newest:
                raise ShiftSignatureError(
                    f"calibration {vector.meta.calibration_id} of {created.isoformat()} is older "
                    f"than one already used here ({newest.isoformat()}): a replay"
                )
            self._newest[entry] = created

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
