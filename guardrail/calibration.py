"""Measuring shift vectors: hidden states with the meaningless image minus without any image."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from guardrail.errors import InvalidInputError
from guardrail.hooks import CapturePlan
from guardrail.prompts import GuardRequest, Rendering, corrupted, render_request, text_only

if TYPE_CHECKING:
    from guardrail.engine import GuardedVLM


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


@torch.no_grad()
def capture_states(vlm: GuardedVLM, renderings: Sequence[Rendering],
                   continuation: torch.Tensor | None = None) -> torch.Tensor:
    """Every layer's hidden states at the last prompt token, and at each token of
    ``continuation`` (``[batch, k]`` ids appended to every prompt):
    ``[num_layers, batch, 1 + k, hidden]`` float32."""
    span = 1 + (0 if continuation is None else continuation.shape[1])
    plan = CapturePlan(range(vlm.num_layers), span)
    inputs = vlm.encode(renderings, continuation)
    with vlm.hooks.activate(plan):
        vlm.model(**inputs, use_cache=False, logits_to_keep=1)
    return plan.stacked(range(vlm.num_layers))


def reference_shifts(vlm: GuardedVLM, renderings: Sequence[Rendering],
                     continuation: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h(x, img') − h(x)`` per layer, row and position (see :func:`capture_states`), and the
    text-only states ``h(x)`` themselves."""
    spec, size = vlm.config.corruption, vlm.default_image_size
    with_corruption = capture_states(vlm, [corrupted(r, spec, size) for r in renderings],
                                     continuation)
    text = capture_states(vlm, [text_only(r) for r in renderings], continuation)
    return with_corruption - text, text


@torch.no_grad()
def text_only_continuation(vlm: GuardedVLM, renderings: Sequence[Rendering],
                           tokens: int) -> torch.Tensor:
    """The model's own greedy text-only answer, exactly ``tokens`` long: ``[batch, tokens]``."""
    inputs = vlm.encode([text_only(r) for r in renderings])
    output = vlm.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                                do_sample=False, pad_token_id=vlm.tokenizer.pad_token_id)
    return output[:, inputs["input_ids"].shape[1]:].cpu()


@dataclass
class CalibrationSums:
    """Running sums of a calibration pass (float64), and a bounded sample of anchor states."""

    prompt: torch.Tensor
    decode: torch.Tensor | None
    text_sum: torch.Tensor
    text_square_sum: torch.Tensor
    count: int
    text_sample: list[torch.Tensor]


def dataset_shift_sums(vlm: GuardedVLM, samples: Iterable[str | GuardRequest], *,
                       batch_size: int, decode_tokens: int, progress: bool,
                       keep_states: int = 1024) -> CalibrationSums:
    """Sums of the prompt-token and generated-token shifts over ``samples``.

    Streams in batches: memory is flat in the number of samples (running sums, plus a reservoir
    sample of at most ``keep_states`` final-layer text-only states for the trust threshold).
    Generated-token shifts are measured on the model's own ``decode_tokens``-long text-only
    answer, fed to both the text-only and the corrupted prompt.
    """
    shape = (vlm.num_layers, vlm.hidden_size)
    sums = CalibrationSums(
        prompt=torch.zeros(shape, dtype=torch.float64),
        decode=torch.zeros(shape, dtype=torch.float64) if decode_tokens else None,
        text_sum=torch.zeros(vlm.hidden_size, dtype=torch.float64),
        text_square_sum=torch.zeros(vlm.hidden_size, dtype=torch.float64),
        count=0, text_sample=[],
    )
    reservoir_rng = random.Random(0)
    size = len(samples) if isinstance(samples, Sequence) else None
    with tqdm(total=size, desc="calibrating", unit="sample", disable=not progress) as bar:
        for chunk in batched(samples, batch_size):
            requests = [GuardRequest(s) if isinstance(s, str) else s for s in chunk]
            renderings = [render_request(r) for r in requests]
            continuation = (text_only_continuation(vlm, renderings, decode_tokens)
                            if decode_tokens else None)
            deltas, text = reference_shifts(vlm, renderings, continuation)
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
