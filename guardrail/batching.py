"""One batched pass from planned rows: reference rows, encoded inputs and the correction plan.

Rows are laid out as the request rows first, then, for each sample-level row, its corrupted
reference row (the prompt with the meaningless image), then its text-only reference row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from guardrail.backends import Backend, Inputs
from guardrail.backends.hooks import (
    ChainedPlan,
    CorrectionPlan,
    LayerPlan,
    Lockstep,
    PassThrough,
    RowTrim,
)
from guardrail.config import GuardConfig
from guardrail.planning import RowPlan
from guardrail.requests import Rendering, corrupted, text_only


@dataclass(frozen=True)
class PreparedBatch:
    """Inputs and correction plan of one pass; ``sample_rows`` index the sample-level rows."""

    plans: list[RowPlan]
    inputs: Inputs
    correction: CorrectionPlan | None
    sample_rows: list[int]
    pass_through: PassThrough | None = None

    @property
    def layer_plan(self) -> LayerPlan | None:
        """What the backend runs with: image-free rows passed through, then the correction."""
        if self.pass_through is None:
            return self.correction
        return ChainedPlan(self.pass_through, self.correction)

    @property
    def request_rows(self) -> int:
        return len(self.plans)

    def live_norms(self) -> dict[int, float]:
        """‖Δ‖ measured at the prompt for each sample-level row (after the pass ran)."""
        norms = self.correction.live_norms if self.correction is not None else None
        if norms is None:
            return {}
        return {row: float(norms[j]) for j, row in enumerate(self.sample_rows)}


def prepare_batch(
    backend: Backend,
    config: GuardConfig,
    layers: Sequence[int],
    renderings: Sequence[Rendering],
    plans: Sequence[RowPlan],
) -> PreparedBatch:
    """Add the reference rows that sample-level rows need, encode, and plan the correction."""
    sample_rows = [i for i, plan in enumerate(plans) if plan.mode == "sample"]
    size = backend.default_image_size()
    rows = list(renderings)
    rows += [corrupted(renderings[i], config.corruption, size) for i in sample_rows]
    rows += [text_only(renderings[i]) for i in sample_rows]
    inputs = backend.encode(rows)
    correction = correction_plan(backend, config, layers, list(plans), sample_rows, inputs)
    image_free = torch.tensor([not row.images for row in rows], device=backend.device)
    pass_through = None
    if backend.image_layers and bool(image_free.any()) and not bool(image_free.all()):
        pass_through = PassThrough(backend.image_layers, image_free)
    return PreparedBatch(list(plans), inputs, correction, sample_rows, pass_through)


def stacked_shifts(vectors: torch.Tensor, layers: Sequence[int], incremental: bool) -> torch.Tensor:
    """Vectors of the edited ``layers``, as increments over the previous edited layer when
    ``incremental`` (per-layer shifts are cumulative along the residual stream)."""
    picked = vectors[list(layers)]
    if incremental:
        picked = torch.cat([picked[:1], picked[1:] - picked[:-1]])
    return picked


def prefill_mask(config: GuardConfig, inputs: Inputs, image_token_id: int) -> torch.Tensor:
    """``[batch, seq]`` bool: the prompt positions the correction edits (``config.positions``)."""
    attention = inputs["attention_mask"].bool()
    if config.positions == "all":
        return attention
    if config.positions == "text":
        return attention & (inputs["input_ids"] != image_token_id)
    last = torch.zeros_like(attention)
    last[:, -1] = True
    return last


def correction_plan(
    backend: Backend,
    config: GuardConfig,
    layers: Sequence[int],
    plans: list[RowPlan],
    sample_rows: list[int],
    inputs: Inputs,
) -> CorrectionPlan | None:
    """Per-row ``α·Δ`` at the edited ``layers``; None when no row is guarded."""
    if not any(plan.guarded for plan in plans):
        return None
    incremental = config.stacking == "incremental"
    total = inputs["input_ids"].shape[0]
    prompt = torch.zeros(len(layers), total, backend.hidden_size)
    decode = torch.zeros(len(layers), total, backend.hidden_size)
    for i, plan in enumerate(plans):
        if plan.mode != "dataset" or plan.shift is None:
            continue
        prompt[:, i] = plan.alpha * stacked_shifts(plan.shift.vectors, layers, incremental)
        if plan.shift.decode_vectors is not None:
            decode[:, i] = plan.alpha * stacked_shifts(
                plan.shift.decode_vectors, layers, incremental
            )
    device, dtype = backend.device, backend.dtype
    lockstep = trim = None
    if sample_rows:
        count, n = len(sample_rows), len(plans)
        lockstep = Lockstep(
            main=torch.tensor(sample_rows, device=device),
            corrupted=torch.arange(n, n + count, device=device),
            text=torch.arange(n + count, n + 2 * count, device=device),
            alpha=torch.tensor([[plans[i].alpha] for i in sample_rows], device=device, dtype=dtype),
        )
        if config.trim_references:
            trim = RowTrim(
                after=layers[-1], keep=n, total=total, arguments=backend.family.trim_arguments
            )
    return CorrectionPlan(
        layers,
        prompt.to(device, dtype),
        decode.to(device, dtype),
        prefill_mask(config, inputs, backend.image_token_id),
        lockstep,
        incremental=incremental,
        trim=trim,
    )
