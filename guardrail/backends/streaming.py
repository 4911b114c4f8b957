"""Glue for transformers' ``generate`` when reference rows ride along with the request rows."""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class ReferenceRowsDone(StoppingCriteria):
    """Marks reference rows finished from the start, so that only request rows keep generation
    going (reference rows are still computed: they are fed the request rows' tokens)."""

    def __init__(self, first_reference: int) -> None:
        self.first_reference = first_reference

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.first_reference :] = True
        return done


class FirstRowStreamer(BaseStreamer):
    """Passes only the request row to a batch-size-1 streamer when reference rows ride along."""

    def __init__(self, inner: BaseStreamer) -> None:
        self.inner = inner

    def put(self, value: torch.Tensor) -> None:
        self.inner.put(value[:1])

    def end(self) -> None:
        self.inner.end()
