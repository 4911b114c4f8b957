"""Shift vector serialization: bit-exact round trip, and every kind of damage rejected."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shift_store import (
    ModelFingerprint,
    ShiftFormatError,
    ShiftMeta,
    ShiftSignatureError,
    ShiftVector,
)


def _vector(layers: int = 3, hidden: int = 8) -> ShiftVector:
    model = ModelFingerprint(
        name_or_path="m", weights_hash="w", config_hash="c", num_layers=layers, hidden_size=hidden
    )
    meta = ShiftMeta(
        model=model,
        level="dataset",
        corruption="blank",
        anchor_size=5,
        anchor_name="a",
        library_version="test",
    )
    return ShiftVector(vectors=torch.randn(layers, hidden), meta=meta)


def test_round_trip_is_bit_exact():
    vector = _vector()
    back = ShiftVector.from_bytes(vector.to_bytes())
    assert torch.equal(back.vectors, vector.vectors)
    assert back.meta == vector.meta and back.checksum == vector.checksum


def test_fingerprint_id_ignores_the_name_but_not_the_weights():
    a = _vector().meta.model
    assert a.model_copy(update={"name_or_path": "elsewhere"}).id == a.id
    assert a.model_copy(update={"weights_hash": "w2"}).id != a.id
    assert a.model_copy(update={"config_hash": "c2"}).id != a.id


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"garbage" + b,  # not safetensors
        lambda b: b[:-4] + bytes(4),  # tensor bytes changed: checksum
        lambda b: b"",
    ],
)
def test_damaged_payload_is_rejected(damage):
    with pytest.raises(ShiftFormatError):
        ShiftVector.from_bytes(damage(_vector().to_bytes()))


def test_wrong_shape_dtype_or_values_are_rejected():
    good = _vector()
    for bad in (
        torch.zeros(2, 8),
        torch.zeros(3, 8, dtype=torch.float64),
        torch.full((3, 8), float("nan")),
    ):
        with pytest.raises(ShiftFormatError):
            ShiftVector(vectors=bad, meta=good.meta)


@pytest.mark.parametrize("signature", ["é" * 64, "\udcff", "", "0" * 64])
def test_any_forged_signature_is_a_signature_error(signature):
    """A writer without the key controls the signature field: non-ASCII text too must be a
    typed refusal, not a TypeError from the comparison."""
    forged = replace(_vector().signed(b"key"), signature=signature)
    with pytest.raises(ShiftSignatureError):
        forged.verify(b"key")
