"""In-process cache in front of a store, and the compute-once protocol for cold starts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shift_store.base import ShiftKey, ShiftStore, StoreUnavailableError
from shift_store.vector import ShiftFormatError, ShiftVector

log = logging.getLogger("shift_store")
# Notes reach API callers in decision records: the store's address stays in the process log.
_UNREACHABLE = "store unreachable (details in the log)"


@dataclass(frozen=True)
class Lookup:
    """Result of a lookup: the vector (or None), its version, and a note when not clean.
    ``store_down`` says the store could not be reached for this lookup; ``verified`` that the
    vector's signature was checked against the deployment's key."""

    vector: ShiftVector | None
    version: str | None = None
    note: str | None = None
    store_down: bool = False
    verified: bool = False


@dataclass
class _Entry:
    lookup: Lookup
    checked_at: float


class CachedShiftSource:
    """The dataset-level vector under one key, cached in process.

    A warm :meth:`current` is an attribute read and a clock check (no I/O). Every
    ``revalidate_s`` seconds it asks the store for the key's version (no tensor transfer) and
    reloads when the vector was replaced. While the store is unreachable it keeps serving the last
    good vector (it belongs to the same key, so the same model) with a note, and retries after
    ``retry_after_s``; it recovers by itself when the store is back.
    """

    def __init__(
        self,
        store: ShiftStore,
        key: ShiftKey,
        *,
        revalidate_s: float = 1.0,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.key = store, key
        self.revalidate_s, self.retry_after_s = revalidate_s, retry_after_s
        self._clock = clock
        self._entry: _Entry | None = None
        self._lock = threading.Lock()
        # set by ensure(): how to compute a missing vector (compute, lock timeout, lock expiry)
        self._compute: tuple[Callable[[], ShiftVector], float, float] | None = None

    def current(self) -> Lookup:
        """The vector to use now (cheap when warm)."""
        entry = self._entry
        if entry is not None and self._clock() - entry.checked_at < self._ttl(entry):
            return entry.lookup
        with self._lock:
            return self._refresh()

    def _ttl(self, entry: _Entry) -> float:
        return self.retry_after_s if entry.lookup.store_down else self.revalidate_s

    def _refresh(self) -> Lookup:
        now = self._clock()
        known = self._entry.lookup if self._entry else Lookup(None)
        if self._entry is not None and now - self._entry.checked_at < self._ttl(self._entry):
            return known  # another thread refreshed it while we waited
        lookup = self._read(known)
        if lookup.vector is None and not lookup.store_down and self._compute is not None:
            lookup = self._compute_missing(lookup)  # a store that came back empty, or damaged
        self._entry = _Entry(lookup, self._clock())
        return lookup

    def _read(self, known: Lookup) -> Lookup:
        try:
            version = self.store.version(self.key)
            if version is not None and version == known.version and known.vector is not None:
                return replace(known, note=None, store_down=False)  # clean after an outage
            if version is None:
                return Lookup(None, note="no dataset-level shift stored for this model")
            found = self.store.get(self.key)
            if not found:
                return Lookup(None, note="vanished during read")
            return Lookup(*found, verified=self.store.signed)
        except StoreUnavailableError as e:
            log.warning("shift store unreachable: %s", e)
            note = _UNREACHABLE
            note += "; using the cached vector" if known.vector else ""
            return replace(known, note=note, store_down=True)
        except ShiftFormatError as e:
            return Lookup(None, note=f"stored shift rejected: {e}")

    def _compute_missing(self, miss: Lookup) -> Lookup:
        """Compute and store the vector, once across processes: the holder of the key's lock
        computes; the others wait ``lock_timeout_s``, then report the miss."""
        assert self._compute is not None
        compute, timeout_s, expire_s = self._compute
        try:
            with self.store.lock(self.key, timeout_s, expire_s) as acquired:
                lookup = self._read(Lookup(None))
                if lookup.vector is not None or lookup.store_down:
                    return lookup  # another process stored it meanwhile
                if not acquired:
                    return Lookup(None, note="another process is computing the shift")
                vector = compute()
                version = self.store.put(self.key, vector)
                log.info("computed and stored shift %s (%s)", self.key.name, miss.note)
        except StoreUnavailableError as e:
            log.warning("shift store unreachable: %s", e)
            return Lookup(None, note=_UNREACHABLE, store_down=True)
        return Lookup(vector, version, verified=self.store.signed)

    def invalidate(self) -> None:
        """Forget the cached state; the next :meth:`current` asks the store."""
        self._entry = None

    def ensure(
        self,
        compute: Callable[[], ShiftVector],
        *,
        lock_timeout_s: float = 0.0,
        lock_expire_s: float = 600.0,
    ) -> Lookup:
        """Return the stored vector, computing and storing it on a miss; from now on, a miss
        found later (a store that came back empty, a damaged entry) is recomputed the same way.

        Across replicas exactly one computes: it holds the key's lock; the others wait up to
        ``lock_timeout_s`` and then report a miss (the engine falls back to sample level and
        picks the vector up once it is stored).
        """
        with self._lock:
            self._compute = (compute, lock_timeout_s, lock_expire_s)
            self._entry = None
            return self._refresh()
