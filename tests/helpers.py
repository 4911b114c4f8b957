"""Helpers shared by the store tests and the subprocesses they start."""

from __future__ import annotations

import torch

from shift_store import ModelFingerprint, ShiftKey, ShiftMeta, ShiftVector

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def make_vector(seed: int = 0, layers: int = 32, hidden: int = 64, model: str = "w") -> ShiftVector:
    fingerprint = ModelFingerprint(
        name_or_path="m", weights_hash=model, config_hash="c", num_layers=layers, hidden_size=hidden
    )
    meta = ShiftMeta(
        model=fingerprint,
        level="dataset",
        corruption="blank",
        anchor_size=4,
        anchor_name="anchors",
        library_version="test",
    )
    return ShiftVector(
        vectors=torch.randn(layers, hidden, generator=torch.Generator().manual_seed(seed)),
        meta=meta,
    )


def key_of(vector: ShiftVector) -> ShiftKey:
    return ShiftKey.for_meta(vector.meta)
