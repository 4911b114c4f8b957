"""The store protocol, store keys and the store's typed errors."""

from __future__ import annotations

import hashlib
import re
from contextlib import AbstractContextManager
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from shift_store.errors import StoreError, StoreUnavailableError
from shift_store.vector import FORMAT_VERSION, ShiftMeta, ShiftVector

__all__ = ["ShiftKey", "ShiftStore", "StoreError", "StoreUnavailableError", "StoredShift"]


# A stored entry larger than this is refused unread, in every store: a 70B model's vector
# (80 x 8192 float32, prompt and decode) is about 5 MB.
MAX_ENTRY_BYTES = 64 * 1024 * 1024


class ShiftKey(BaseModel):
    """What a stored vector fits: model, corruption, measurement position, anchor set, format.

    The edited layers are not part of the key: a vector holds every layer, and the layers to edit
    are chosen when it is applied.
    """

    model_config = ConfigDict(frozen=True)

    model_id: str
    corruption: str
    position: str = "last-prompt-token"
    anchor: str
    format_version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        """Key text, safe for Redis and file names."""
        anchor = re.sub(r"[^A-Za-z0-9._-]", "_", self.anchor)[:48]
        digest = hashlib.sha256(self.anchor.encode()).hexdigest()[:8]
        return (
            f"v{self.format_version}.{self.model_id}.{self.corruption}.{self.position}."
            f"{anchor}-{digest}"
        )

    @classmethod
    def for_meta(cls, meta: ShiftMeta) -> ShiftKey:
        """The key a vector with ``meta`` belongs under."""
        return cls(
            model_id=meta.model.id,
            corruption=meta.corruption,
            position=meta.position,
            anchor=meta.anchor_name or "unnamed",
            format_version=meta.format_version,
        )


class StoredShift(BaseModel):
    """A listing entry: the key, its metadata and version, without the tensor."""

    key: str
    meta: ShiftMeta
    version: str


class ShiftStore(Protocol):
    """Where dataset-level shift vectors live. Every back end implements these operations.

    ``version`` is cheap (no tensor transfer) and changes whenever the vector under a key is
    replaced; ``lock`` serialises the computation of a missing vector across processes.
    """

    namespace: str
    signed: bool  # vectors are signed on put and verified on every get (SignedStore)

    def get(self, key: ShiftKey) -> tuple[ShiftVector, str] | None:
        """The vector and its version, or None. Raises ``ShiftFormatError`` on damaged data."""
        ...

    def version(self, key: ShiftKey) -> str | None:
        """The current version under ``key`` (None when absent)."""
        ...

    def put(self, key: ShiftKey, vector: ShiftVector) -> str:
        """Store ``vector`` atomically; return its version."""
        ...

    def delete(self, key: ShiftKey) -> bool:
        """Remove ``key``; True if something was removed."""
        ...

    def list(self) -> list[StoredShift]:
        """Every stored vector of this namespace, metadata only."""
        ...

    def lock(
        self,
        key: ShiftKey,
        timeout_s: float,
        expire_s: float,
    ) -> AbstractContextManager[bool]:
        """Hold the compute lock of ``key``; yields False when not acquired within ``timeout_s``.
        A crashed holder's lock lapses after ``expire_s`` (Redis) or with its process (files)."""
        ...
