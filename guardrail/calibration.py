"""Measuring shift vectors on a backend: hidden states with the meaningless image minus without
any image, for one input (sample level) or averaged over an anchor set (dataset level)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.backends import BackendRequest, CapturingBackend, Sampling, run_to_completion
from guardrail.config import CorruptionSpec
from guardrail.errors import InvalidInputError
from guardrail.requests import GuardRequest, Rendering, corrupted, render_request, text_only
from guardrail.shifts import MEASURED_POSITION
from guardrail.trust import calibrate_threshold
from guardrail.version import __version__
from shift_store import ShiftMeta, ShiftVector


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def capture_states(
    backend: CapturingBackend,
    renderings: Sequence[Rendering],
    continuation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every layer's hidden states at the last prompt token, and at each token of
    ``continuation`` (``[batch, k]`` ids appended to every prompt):
    ``[num_layers, batch, 1 + k, hidden]`` float32."""
    return backend.capture_states(renderings, continuation)


def reference_shifts(
    backend: CapturingBackend,
    corruption: CorruptionSpec,
    renderings: Sequence[Rendering],
    continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h(x, img') − h(x)`` per layer, row and position (see :func:`capture_states`), and the
    text-only states ``h(x)`` themselves."""
    size = backend.default_image_size()
    with_corruption = capture_states(
        backend, [corrupted(r, corruption, size) for r in renderings], continuation
    )
    text = capture_states(backend, [text_only(r) for r in renderings], continuation)
    return with_corruption - text, text


def text_only_continuation(
    backend: CapturingBackend, renderings: Sequence[Rendering], tokens: int
) -> torch.Tensor:
    """The model's own greedy text-only answer, exactly ``tokens`` long: ``[batch, tokens]``."""
    sampling = Sampling(max_new_tokens=tokens, min_new_tokens=tokens)
    requests = [BackendRequest(str(i), text_only(r), sampling) for i, r in enumerate(renderings)]
    answers = run_to_completion(backend.open_batch(), requests)
    return torch.tensor([answers[str(i)].tokens for i in range(len(renderings))])


@dataclass
class CalibrationSums:
    """Running sums of a calibration pass (float64), and a bounded sample of anchor states."""

    prompt: torch.Tensor
    decode: torch.Tensor | None
    text_sum: torch.Tensor
    text_square_sum: torch.Tensor
    count: int
    text_sample: list[torch.Tensor]


def dataset_shift_sums(
    backend: CapturingBackend,
    corruption: CorruptionSpec,
    samples: Iterable[str | GuardRequest],
    *,
    batch_size: int,
    decode_tokens: int,
    progress: bool,
    keep_states: int = 1024,
) -> CalibrationSums:
    """Sums of the prompt-token and generated-token shifts over ``samples``.

    Streams in batches: memory is flat in the number of samples (running sums, plus a reservoir
    sample of at most ``keep_states`` final-layer text-only states for the trust threshold).
    Generated-token shifts are measured on the model's own ``decode_tokens``-long text-only
    answer, fed to both the text-only and the corrupted prompt.
    """
    shape = (backend.num_layers, backend.hidden_size)
    sums = CalibrationSums(
        prompt=torch.zeros(shape, dtype=torch.float64),
        decode=torch.zeros(shape, dtype=torch.float64) if decode_tokens else None,
        text_sum=torch.zeros(backend.hidden_size, dtype=torch.float64),
        text_square_sum=torch.zeros(backend.hidden_size, dtype=torch.float64),
        count=0,
        text_sample=[],
    )
    reservoir_rng = random.Random(0)
    size = len(samples) if isinstance(samples, Sequence) else None
    with tqdm(
        total=size, desc="calibrating", unit="sample", disable=None if progress else True
    ) as bar:
        for chunk in batched(samples, batch_size):
            requests = [GuardRequest(s) if isinstance(s, str) else s for s in chunk]
            renderings = [render_request(r) for r in requests]
            continuation = (
                text_only_continuation(backend, renderings, decode_tokens)
                if decode_tokens
                else None
            )
            deltas, text = reference_shifts(backend, corruption, renderings, continuation)
            deltas = deltas.double().cpu()
            sums.prompt += deltas[:, :, 0].sum(dim=1)
            if sums.decode is not None:
                sums.decode += deltas[:, :, 1:].mean(dim=2).sum(dim=1)
            final = text[-1, :, 0].double().cpu()  # [batch, hidden]
            sums.text_sum += final.sum(dim=0)
            sums.text_square_sum += final.square().sum(dim=0)
            for state in final.float():
                sums.count += 1
                if len(sums.text_sample) < keep_states:
                    sums.text_sample.append(state)
                elif (slot := reservoir_rng.randrange(sums.count)) < keep_states:
                    sums.text_sample[slot] = state
            bar.update(len(renderings))
    if sums.count == 0:
        raise InvalidInputError("the anchor data set is empty")
    return sums


def compute_dataset_shift(
    backend: CapturingBackend,
    corruption: CorruptionSpec,
    samples: Iterable[str | GuardRequest],
    *,
    batch_size: int = 8,
    anchor_name: str | None = None,
    decode_tokens: int = 8,
    progress: bool = True,
) -> ShiftVector:
    """Average ``Δ = h(x, img') − h(x)`` over an anchor data set, streaming in batches.

    ``vectors`` is measured at the last prompt token; ``decode_vectors`` over the first
    ``decode_tokens`` tokens of the model's own text-only answer (0 skips them, and decode
    steps are then not corrected). Anchor statistics for the trust policy come with it.
    """
    sums = dataset_shift_sums(
        backend,
        corruption,
        samples,
        batch_size=batch_size,
        decode_tokens=decode_tokens,
        progress=progress,
    )
    n = sums.count
    mean = sums.text_sum / n
    std = (sums.text_square_sum / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    mean, std = mean.float(), std.float()
    threshold = calibrate_threshold(mean, std, sums.text_sample)  # 0 with a single anchor
    meta = ShiftMeta(
        model=backend.fingerprint,
        level="dataset",
        corruption=corruption.tag,
        position=MEASURED_POSITION,
        anchor_name=anchor_name,
        anchor_size=n,
        library_version=__version__,
        anchor_distance_threshold=threshold if threshold > 0 else None,
    )
    return ShiftVector(
        vectors=(sums.prompt / n).float(),
        meta=meta,
        anchor_mean=mean,
        anchor_std=std,
        decode_vectors=None if sums.decode is None else (sums.decode / n).float(),
    )


def compute_sample_shift(
    backend: CapturingBackend, corruption: CorruptionSpec, rendering: Rendering
) -> ShiftVector:
    """``Δ`` at the last prompt token of one input (two prefill-only passes)."""
    delta = reference_shifts(backend, corruption, [rendering])[0][:, 0, 0].cpu()
    meta = ShiftMeta(
        model=backend.fingerprint,
        level="sample",
        anchor_size=1,
        corruption=corruption.tag,
        position=MEASURED_POSITION,
        library_version=__version__,
    )
    return ShiftVector(vectors=delta.float().contiguous(), meta=meta)
