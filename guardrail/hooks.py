"""Forward hooks on decoder layers: capture of hidden states and the CMRM correction.

Hooks are installed while at least one call is running and removed when the last one ends (also on
exceptions and cancellation). Each hook dispatches to the *plan* of the calling thread or task
through a :class:`~contextvars.ContextVar`, so concurrent calls on one model never see each other's
correction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
from torch import nn

from guardrail.errors import GuardrailError


class LayerPlan(Protocol):
    """What to do with each decoder layer's output during one forward or ``generate`` call."""

    def on_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Return a replacement for ``hidden`` (``[batch, seq, hidden]``), or None to keep it."""
        ...


_ACTIVE: ContextVar[tuple[int, LayerPlan] | None] = ContextVar("cmrm_plan", default=None)


class DecoderHooks:
    """Installs dispatching hooks on ``layers`` for the duration of :meth:`activate`."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self._layers = list(layers)
        self._lock = threading.Lock()
        self._users = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @contextmanager
    def activate(self, plan: LayerPlan) -> Iterator[None]:
        """Run the body with ``plan`` applied to this thread's (or task's) forward passes."""
        token = _ACTIVE.set((id(self), plan))
        with self._lock:
            if self._users == 0:
                self._handles = [
                    layer.register_forward_hook(self._make_hook(i))
                    for i, layer in enumerate(self._layers)
                ]
            self._users += 1
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for handle in self._handles:
                        handle.remove()
                    self._handles = []

    def _make_hook(self, index: int):
        owner = id(self)

        def hook(_module: nn.Module, _args: tuple, output):
            active = _ACTIVE.get()
            if active is None or active[0] != owner:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            replaced = active[1].on_output(index, hidden)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return hook


class CapturePlan:
    """Records each wanted layer's hidden state at the last position (left-padded batches)."""

    def __init__(self, layers: Sequence[int]) -> None:
        self._wanted = set(layers)
        self.states: dict[int, torch.Tensor] = {}

    def on_output(self, layer: int, hidden: torch.Tensor) -> None:
        if layer in self._wanted:
            self.states[layer] = hidden[:, -1, :].float()

    def stacked(self, layers: Sequence[int]) -> torch.Tensor:
        """States as ``[len(layers), batch, hidden]`` float32."""
        return torch.stack([self.states[layer] for layer in layers])


class CorrectionPlan:
    """Subtracts a per-row shift at chosen layers: ``h ← h − shift[row]``.

    ``shifts[k]`` (``[batch, hidden]``, already scaled by each row's α, zero for unguarded rows)
    applies at ``layers[k]``. In the prefill pass only positions in ``prefill_mask``
    (``[batch, seq]``) are edited; every later (decode) pass edits its single new token.
    """

    def __init__(self, layers: Sequence[int], shifts: torch.Tensor,
                 prefill_mask: torch.Tensor) -> None:
        self._slot = {layer: k for k, layer in enumerate(layers)}
        self._shifts = shifts.unsqueeze(2)  # [K, batch, 1, hidden]
        self._mask = prefill_mask.to(shifts.dtype).unsqueeze(-1)  # [batch, seq, 1]
        self._passes = [0] * len(layers)

    def on_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        k = self._slot.get(layer)
        if k is None:
            return None
        first = self._passes[k] == 0
        self._passes[k] += 1
        if first:
            if hidden.shape[1] != self._mask.shape[1]:
                raise GuardrailError(
                    f"prefill length {hidden.shape[1]} does not match the prompt "
                    f"({self._mask.shape[1]} tokens); generate must run with the KV cache on"
                )
            return hidden - self._mask * self._shifts[k]
        if hidden.shape[1] != 1:
            raise GuardrailError("decode step with more than one new token is not supported")
        return hidden - self._shifts[k]
