"""Measuring shift vectors: hidden states with the meaningless image minus without any image."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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
                     continuation: torch.Tensor | None = None) -> torch.Tensor:
    """``h(x, img') − h(x)`` per layer, row and position (see :func:`capture_states`)."""
    spec, size = vlm.config.corruption, vlm.default_image_size
    with_corruption = capture_states(vlm, [corrupted(r, spec, size) for r in renderings],
                                     continuation)
    return with_corruption - capture_states(vlm, [text_only(r) for r in renderings], continuation)


@torch.no_grad()
def text_only_continuation(vlm: GuardedVLM, renderings: Sequence[Rendering],
                           tokens: int) -> torch.Tensor:
    """The model's own greedy text-only answer, exactly ``tokens`` long: ``[batch, tokens]``."""
    inputs = vlm.encode([text_only(r) for r in renderings])
    output = vlm.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                                do_sample=False, pad_token_id=vlm.tokenizer.pad_token_id)
    return output[:, inputs["input_ids"].shape[1]:].cpu()


def dataset_shift_sums(vlm: GuardedVLM, samples: Iterable[str | GuardRequest], *,
                       batch_size: int, decode_tokens: int,
                       progress: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Sums of the prompt-token and generated-token shifts over ``samples``, and their count.

    Streams in batches: memory is flat in the number of samples (float64 running sums only).
    Generated-token shifts are measured on the model's own ``decode_tokens``-long text-only
    answer, fed to both the text-only and the corrupted prompt.
    """
    shape = (vlm.num_layers, vlm.hidden_size)
    prompt_sum = torch.zeros(shape, dtype=torch.float64)
    decode_sum = torch.zeros(shape, dtype=torch.float64)
    count = 0
    size = len(samples) if isinstance(samples, Sequence) else None
    with tqdm(total=size, desc="calibrating", unit="sample", disable=not progress) as bar:
        for chunk in batched(samples, batch_size):
            requests = [GuardRequest(s) if isinstance(s, str) else s for s in chunk]
            renderings = [render_request(r) for r in requests]
            continuation = (text_only_continuation(vlm, renderings, decode_tokens)
                            if decode_tokens else None)
            deltas = reference_shifts(vlm, renderings, continuation).double().cpu()
            prompt_sum += deltas[:, :, 0].sum(dim=1)
            if decode_tokens:
                decode_sum += deltas[:, :, 1:].mean(dim=2).sum(dim=1)
            count += len(renderings)
            bar.update(len(renderings))
    if count == 0:
        raise InvalidInputError("the anchor data set is empty")
    return prompt_sum, (decode_sum if decode_tokens else None), count
