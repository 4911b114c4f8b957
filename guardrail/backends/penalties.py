"""Logit bias and repetition, frequency and presence penalties on one row's logits, as vLLM and
OpenAI define them (see :class:`~guardrail.backends.base.Sampling`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guardrail.backends.base import Sampling


def penalize(
    scores: torch.Tensor, sampling: Sampling, prompt: torch.Tensor | None, answer: Sequence[int]
) -> None:
    """Apply ``sampling``'s bias and penalties to ``scores`` (``[vocab]``, in place), given the
    row's ``prompt`` token ids and the ``answer`` tokens chosen so far."""
    vocab = scores.shape[-1]
    for token, bias in sampling.logit_bias:
        if token < vocab:
            scores[token] += bias
    generated = torch.tensor(list(answer), dtype=torch.long, device=scores.device)
    if sampling.repetition_penalty != 1.0:
        seen = generated if prompt is None else torch.cat([prompt.to(scores.device), generated])
        seen = torch.unique(seen)
        picked = scores[seen]
        penalty = sampling.repetition_penalty
        scores[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if len(answer) and (sampling.frequency_penalty or sampling.presence_penalty):
        counts = torch.bincount(generated, minlength=vocab)[:vocab].to(scores.dtype)
        scores -= sampling.frequency_penalty * counts
        scores -= sampling.presence_penalty * (counts > 0).to(scores.dtype)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """``scores`` (``[batch, vocab]``, after temperature) with tokens whose probability is under
    ``min_p`` times the top one's set to -inf."""
    probabilities = scores.softmax(dim=-1)
    floor = min_p * probabilities.max(dim=-1, keepdim=True).values
    return scores.masked_fill(probabilities < floor, -float("inf"))
