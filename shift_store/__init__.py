"""Storage of shift vectors: tensors, metadata and stores; nothing of models."""

from shift_store.vector import (
    FORMAT_VERSION,
    ModelFingerprint,
    ShiftFormatError,
    ShiftMeta,
    ShiftVector,
)

__all__ = ["FORMAT_VERSION", "ModelFingerprint", "ShiftFormatError", "ShiftMeta", "ShiftVector"]
