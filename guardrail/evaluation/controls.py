"""Controls and a steering baseline for judging CMRM: vectors applied exactly as a dataset-level
shift is (``h − α·v`` at the guard's layers), so that any difference is the vector's.

* :func:`negated` - the shift pointing the other way: it should make things worse, not better.
* :func:`random_direction` - a seeded random direction with each layer's norm of the shift: a
  correction of the same size that knows nothing of images.
* :func:`refusal_direction` - difference of means of text-only states on harmless and harmful
  prompts (Arditi et al. 2024's refusal direction, here added rather than ablated): steering
  toward refusal without looking at the picture.

Set one on a view with :meth:`GuardedVLM.set_dataset_shift` and run it in ``dataset`` mode. A
vector set this way is not checked for plausibility (only stored ones are), which is what a
control needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from guardrail.calibration import batched, capture_states
from guardrail.engine import GuardedVLM
from guardrail.errors import InvalidInputError
from guardrail.requests import GuardRequest, render_request
from guardrail.shifts import MEASURED_POSITION
from guardrail.version import __version__
from shift_store import ShiftMeta, ShiftVector


def negated(shift: ShiftVector) -> ShiftVector:
    """``shift`` pointing the other way, at every layer (decode vectors too)."""
    decode = None if shift.decode_vectors is None else -shift.decode_vectors
    return replace(
        shift,
        vectors=-shift.vectors,
        decode_vectors=decode,
        meta=shift.meta.model_copy(update={"anchor_name": f"negated {shift.meta.anchor_name}"}),
        signature=None,
    )


def _same_norms(vectors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    direction = torch.randn(vectors.shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    scaled: torch.Tensor = direction * vectors.norm(dim=-1, keepdim=True)
    return scaled


def random_direction(shift: ShiftVector, seed: int = 0) -> ShiftVector:
    """A random direction per layer (seeded) with the norm ``shift`` has at that layer."""
    generator = torch.Generator().manual_seed(seed)
    vectors = _same_norms(shift.vectors, generator)
    decode = None if shift.decode_vectors is None else _same_norms(shift.decode_vectors, generator)
    return replace(
        shift,
        vectors=vectors,
        decode_vectors=decode,
        meta=shift.meta.model_copy(update={"anchor_name": f"random (seed {seed})"}),
        signature=None,
    )


def _mean_text_state(vlm: GuardedVLM, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Mean text-only state at the last prompt token, every layer: ``[num_layers, hidden]``."""
    total = torch.zeros(vlm.num_layers, vlm.hidden_size, dtype=torch.float64)
    for chunk in batched(prompts, batch_size):
        renderings = [render_request(GuardRequest(p)) for p in chunk]
        states = capture_states(vlm.backend, renderings)  # [layers, batch, 1, hidden]
        total += states[:, :, 0].double().sum(dim=1).cpu()
    return total / len(prompts)


def refusal_direction(
    vlm: GuardedVLM,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    batch_size: int = 8,
) -> ShiftVector:
    """``mean h(harmless) − mean h(harmful)`` per layer, text only, at the last prompt token.

    Applied as a shift (``h − α·v``) it adds the harmful-minus-harmless direction: the state
    moves toward where harmful requests sit, which is where the model refuses. The same vector
    is applied at decode steps. No picture is involved, so it cannot tell a harmful picture
    from a harmless one; it can only push every answer toward refusal.
    """
    if not harmful or not harmless:
        raise InvalidInputError("the refusal direction needs harmful and harmless prompts")
    vectors = (
        _mean_text_state(vlm, harmless, batch_size) - _mean_text_state(vlm, harmful, batch_size)
    ).float()
    meta = ShiftMeta(
        model=vlm.fingerprint,
        level="dataset",
        corruption=vlm.config.corruption.tag,
        position=MEASURED_POSITION,
        anchor_name="refusal direction",
        anchor_size=len(harmful) + len(harmless),
        library_version=__version__,
    )
    return ShiftVector(vectors=vectors, meta=meta, decode_vectors=vectors.clone())
