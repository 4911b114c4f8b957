"""Shift vectors: one float32 vector per decoder layer, with the metadata that says what they fit.

This module knows tensors and metadata only; the engine (``guardrail``) computes the vectors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import BinaryIO, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shift_store.errors import StoreError

# 2: the checksum covers the metadata; optional HMAC signature. 3: the metadata lists the
# entry's tensors and names its calibration (id and time), so the signature binds both.
FORMAT_VERSION = 3
_TENSOR = "shift"
_OPTIONAL_TENSORS = ("decode_vectors", "anchor_mean", "anchor_std")
_SIGNATURE_FORM = re.compile(r"[0-9a-f]{64}")
_META = "cmrm_meta"
_SIGNATURE = "hmac-sha256"
_MAX_HEADER = 1 << 20


class ShiftFormatError(StoreError, ValueError):
    """A serialized shift vector cannot be parsed, or its checksum, shape or dtype is wrong."""


class ShiftSignatureError(ShiftFormatError):
    """A signing key is configured and the vector is unsigned or signed with another key."""


class ModelFingerprint(BaseModel):
    """Identity of a model checkpoint: a changed checkpoint or config gives another ``id``."""

    model_config = ConfigDict(frozen=True)

    name_or_path: str
    revision: str | None = None
    weights_hash: str
    config_hash: str
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)

    @property
    def id(self) -> str:
        """Short digest of everything that makes a vector fit this model (not the name)."""
        payload = f"{self.weights_hash}:{self.config_hash}:{self.num_layers}:{self.hidden_size}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ShiftMeta(BaseModel):
    """Everything needed to decide whether a shift vector may be applied to a model.

    ``tensors`` lists the entry's tensors (set by :class:`ShiftVector`): a stored entry holding
    fewer or more is refused. ``calibration_id`` and ``created_at`` name the calibration, so
    that a signature binds it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelFingerprint
    level: Literal["dataset", "sample"]
    corruption: str
    position: str = "last-prompt-token"
    anchor_name: str | None = None
    anchor_size: int = Field(ge=1)
    library_version: str
    format_version: int = FORMAT_VERSION
    anchor_distance_threshold: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    calibration_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    tensors: tuple[str, ...] = ()
    extra: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class ShiftVector:
    """Per-layer shift ``Δ^l``, float32, shape ``[num_layers, hidden]``.

    ``vectors`` is measured at the last prompt token; ``decode_vectors`` (optional) is the mean
    shift over generated tokens, which points elsewhere (see docs/defaults.md) and is applied at
    decode steps. ``anchor_mean`` and ``anchor_std`` (``[hidden]``, optional) describe the anchor
    set's text-only final states, for the anchor-distance trust policy. Validated on
    construction; the tensors must not be mutated afterwards (the checksum is cached).
    """

    vectors: torch.Tensor
    meta: ShiftMeta
    decode_vectors: torch.Tensor | None = None
    anchor_mean: torch.Tensor | None = None
    anchor_std: torch.Tensor | None = None
    signature: str | None = field(default=None, repr=False, compare=False)  # HMAC, if signed
    checksum: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        held = (_TENSOR, *(n for n in _OPTIONAL_TENSORS if getattr(self, n) is not None))
        if self.meta.tensors != held:  # the metadata lists what the vector holds
            object.__setattr__(self, "meta", self.meta.model_copy(update={"tensors": held}))
        if (self.anchor_mean is None) != (self.anchor_std is None):
            raise ShiftFormatError("anchor statistics need both anchor_mean and anchor_std")
        layers, hidden = self.meta.model.num_layers, self.meta.model.hidden_size
        digest = hashlib.sha256()
        for name in ("vectors", *_OPTIONAL_TENSORS):
            tensor = getattr(self, name)
            if tensor is None:
                continue
            expected = (hidden,) if name.startswith("anchor") else (layers, hidden)
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != expected:
                raise ShiftFormatError(
                    f"shift vectors must be float32 of shape {expected}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ShiftFormatError("shift vectors contain NaN or infinity")
            digest.update(tensor.contiguous().numpy().tobytes())
        digest.update(self.meta.model_dump_json().encode())  # metadata is covered too
        object.__setattr__(self, "checksum", digest.hexdigest())

    def _hmac(self, key: bytes, context: str) -> str:
        message = f"{self.checksum}\n{context}".encode()
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def signed(self, key: bytes, context: str = "") -> ShiftVector:
        """This vector with its HMAC-SHA256 signature under ``key``, over the checksum (so
        over every tensor and the metadata) and ``context`` (where it is stored: a signed
        vector copied to another entry no longer verifies)."""
        return replace(self, signature=self._hmac(key, context))

    def verify(self, key: bytes, context: str = "") -> None:
        """Raise :class:`ShiftSignatureError` unless signed with ``key`` for ``context``."""
        if self.signature is None:
            raise ShiftSignatureError("unsigned shift vector refused: a signing key is set")
        # as bytes: compare_digest raises TypeError on non-ASCII text, which a writer controls
        given = self.signature.encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, self._hmac(key, context).encode()):
            raise ShiftSignatureError("shift vector signature does not match the key")

    @property
    def norms(self) -> torch.Tensor:
        """L2 norm of each layer's vector."""
        norms: torch.Tensor = self.vectors.norm(dim=-1)
        return norms

    def to_bytes(self) -> bytes:
        """Serialize as safetensors, metadata, checksum and any signature inside. Never
        pickle."""
        header = {_META: self.meta.model_dump_json(), "sha256": self.checksum}
        if self.signature is not None:
            header[_SIGNATURE] = self.signature
        tensors = {_TENSOR: self.vectors.contiguous()}
        for name in _OPTIONAL_TENSORS:
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        return st_save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, payload: bytes) -> ShiftVector:
        """Parse :meth:`to_bytes` output (a signature is read, not checked: see
        :class:`~shift_store.signing.SignedStore`). This is the one parser of stored entries:
        anything amiss, whatever the bytes, raises :class:`ShiftFormatError`."""
        try:
            return cls._parse(payload)
        except ShiftFormatError:
            raise
        except Exception as e:  # untrusted bytes: every failure is a format error
            raise ShiftFormatError(f"unreadable shift payload: {type(e).__name__}: {e}") from e

    @classmethod
    def _parse(cls, payload: bytes) -> ShiftVector:
        header = _safetensors_metadata(payload)
        meta = ShiftMeta.model_validate_json(header[_META])
        if not meta.tensors:
            raise ShiftFormatError("shift metadata does not list the entry's tensors")
        tensors = st_load(payload)
        if sorted(tensors) != sorted(meta.tensors):
            raise ShiftFormatError(
                f"entry holds tensors {sorted(tensors)}, its metadata lists {sorted(meta.tensors)}"
            )
        signature = header.get(_SIGNATURE)
        if signature is not None and not _SIGNATURE_FORM.fullmatch(signature):
            raise ShiftFormatError("signature field is not a hex HMAC-SHA256")
        optional = {name: tensors.get(name) for name in _OPTIONAL_TENSORS}
        vector = cls(vectors=tensors[_TENSOR], meta=meta, **optional, signature=signature)
        if vector.checksum != header.get("sha256"):
            raise ShiftFormatError("shift payload checksum mismatch")
        return vector


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    size = int.from_bytes(payload[:8], "little")
    if len(payload) < 8 or size <= 0 or size > len(payload) - 8:
        raise ShiftFormatError("truncated safetensors header")
    header = json.loads(payload[8 : 8 + size])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ShiftFormatError("safetensors metadata is not a map of strings")
    return metadata


def read_meta(stream: BinaryIO) -> ShiftMeta:
    """The metadata of a serialized vector, reading only the safetensors header from ``stream``."""
    prefix = stream.read(8)
    size = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    if not 0 < size <= _MAX_HEADER:
        raise ShiftFormatError("bad safetensors header size")
    try:
        header = _safetensors_metadata(prefix + stream.read(size))
        return ShiftMeta.model_validate_json(header[_META])
    except ShiftFormatError:
        raise
    except Exception as e:  # untrusted bytes, as in ShiftVector.from_bytes
        raise ShiftFormatError(f"unreadable shift metadata: {type(e).__name__}: {e}") from e
