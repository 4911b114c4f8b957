"""The backend protocol: what the engine needs from a model runtime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from guardrail.backends.hooks import LayerPlan
from guardrail.constraints import OutputConstraint
from guardrail.families import ModelFamily
from guardrail.requests import Rendering
from shift_store import ModelFingerprint

Inputs = dict[str, torch.Tensor]
# What loads with a model: a multimodal processor, or a bare tokenizer.
Processor = ProcessorMixin | PreTrainedTokenizerBase


class Backend(Protocol):
    """A loaded vision-language model that can run with a :class:`LayerPlan` applied.

    The engine plans, the backend runs: it renders and encodes conversations, and runs forward
    passes and generation with the plan's hooks on its decoder layers. ``TransformersBackend``
    is the first implementation; another runtime implements these members.
    """

    family: ModelFamily
    fingerprint: ModelFingerprint
    model: nn.Module
    layers: nn.ModuleList
    num_layers: int
    hidden_size: int
    image_token_id: int
    image_layers: tuple[int, ...]  # layers that run only with an image (cross-attention)
    placeholders: tuple[str, ...]  # image/video placeholder tokens, never allowed in user text
    tokenizer: PreTrainedTokenizerBase
    takes_tools: bool  # the chat template renders tools itself

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def default_image_size(self) -> tuple[int, int]:
        """(width, height) of the corruption image for a prompt without an image."""
        ...

    def encode(
        self, renderings: Sequence[Rendering], continuation: torch.Tensor | None = None
    ) -> Inputs:
        """Model inputs for ``renderings``, left-padded, with ``continuation`` ids
        (``[batch, k]``) appended to every row when given."""
        ...

    def forward(
        self, inputs: Inputs, plan: LayerPlan | None, *, use_cache: bool = True
    ) -> torch.Tensor:
        """One forward pass with ``plan`` applied: last-position logits ``[batch, vocab]``."""
        ...

    def generate(
        self, inputs: Inputs, plan: LayerPlan | None, *, request_rows: int, **generation: Any
    ) -> torch.Tensor:
        """Generate with ``plan`` applied; rows past ``request_rows`` are reference rows that
        never stop generation nor reach a streamer. Returns prompt plus new token ids."""
        ...

    def constrained(self, constraints: Mapping[int, OutputConstraint]) -> Any:
        """A logits processor for :meth:`generate` that holds the batch rows named in
        ``constraints`` to their constraint and leaves the other rows alone."""
        ...

    def stop_token_ids(self) -> set[int]:
        """Token ids that end an answer (end of sequence and padding)."""
        ...
