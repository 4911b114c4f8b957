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
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from guardrail.errors import GuardrailError


class LayerPlan(Protocol):
    """What to do with each decoder layer's output during one forward or ``generate`` call.

    ``hooked`` names the layers (and :data:`EMBEDDINGS`) the plan needs to see; only those get a
    hook, so layers a plan does not touch cost nothing per step.
    """

    hooked: frozenset[int]

    def on_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Return a replacement for ``hidden`` (``[batch, seq, hidden]``), or None to keep it."""
        ...


_ACTIVE: ContextVar[tuple[int, LayerPlan] | None] = ContextVar("cmrm_plan", default=None)
EMBEDDINGS = -1  # the layer index plans see for the input embedding module's output


class DecoderHooks:
    """Installs dispatching hooks on decoder layers (and the input embeddings) while plans that
    need them are active; each hook is reference-counted across concurrent calls."""

    def __init__(self, layers: Sequence[nn.Module], embeddings: nn.Module) -> None:
        self._modules = dict(enumerate(layers))
        self._modules[EMBEDDINGS] = embeddings
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}

    @contextmanager
    def activate(self, plan: LayerPlan) -> Iterator[None]:
        """Run the body with ``plan`` applied to this thread's (or task's) forward passes."""
        token = _ACTIVE.set((id(self), plan))
        with self._lock:
            for index in plan.hooked:
                if self._users.get(index, 0) == 0:
                    hook = self._make_hook(index)
                    self._handles[index] = self._modules[index].register_forward_hook(hook)
                self._users[index] = self._users.get(index, 0) + 1
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            with self._lock:
                for index in plan.hooked:
                    self._users[index] -= 1
                    if self._users[index] == 0:
                        self._handles.pop(index).remove()

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
    """Records each wanted layer's hidden states at the last ``span`` positions."""

    def __init__(self, layers: Sequence[int], span: int = 1) -> None:
        self._wanted = set(layers)
        self.hooked = frozenset(self._wanted)
        self._span = span
        self.states: dict[int, torch.Tensor] = {}

    def on_output(self, layer: int, hidden: torch.Tensor) -> None:
        if layer in self._wanted:
            self.states[layer] = hidden[:, -self._span :, :].float()

    def stacked(self, layers: Sequence[int]) -> torch.Tensor:
        """States as ``[len(layers), batch, span, hidden]`` float32."""
        return torch.stack([self.states[layer] for layer in layers])


@dataclass(frozen=True)
class Lockstep:
    """Sample-level rows computed inside the same batched pass.

    Row ``main[j]`` is corrected with the live difference of its reference rows ``corrupted[j]``
    (the prompt with the meaningless image) and ``text[j]`` (the prompt without image), scaled by
    ``alpha[j]``. At every decode step the reference rows are fed the main row's new token, so the
    shift is measured at each generated position, not extrapolated from the prompt.
    """

    main: torch.Tensor  # [J] long
    corrupted: torch.Tensor  # [J] long
    text: torch.Tensor  # [J] long
    alpha: torch.Tensor  # [J, 1] in the model dtype


class CorrectionPlan:
    """Subtracts a per-row shift at chosen layers: ``h ← h − shift[row]``.

    ``prompt_shifts[k]`` and ``decode_shifts[k]`` (``[batch, hidden]``, already scaled by each
    row's α, zero for unguarded rows) apply at ``layers[k]``: the first in the prefill pass at the
    positions of ``prefill_mask`` (``[batch, seq]``), the second at every decode step. With
    ``lockstep``, live sample-level shifts are added for its rows. With ``incremental``, a layer's
    live shift is its difference to the previous edited layer's.
    """

    def __init__(self, layers: Sequence[int], prompt_shifts: torch.Tensor,
                 decode_shifts: torch.Tensor, prefill_mask: torch.Tensor,
                 lockstep: Lockstep | None = None, incremental: bool = True) -> None:
        self._slot = {layer: k for k, layer in enumerate(layers)}
        self.hooked = frozenset(self._slot) | ({EMBEDDINGS} if lockstep else frozenset())
        self._prompt = prompt_shifts.unsqueeze(2)  # [K, batch, 1, hidden]
        self._decode = decode_shifts.unsqueeze(2)
        self._mask = prefill_mask.to(prompt_shifts.dtype).unsqueeze(-1)  # [batch, seq, 1]
        self._lockstep = lockstep
        self._incremental = incremental
        self._passes = [0] * len(layers)
        self._embedding_passes = 0
        self._previous_live: torch.Tensor | None = None
        self.live_norms: torch.Tensor | None = None  # ‖Δ‖ of lockstep rows at the prompt

    def on_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer == EMBEDDINGS:
            return self._feed_references(hidden)
        k = self._slot.get(layer)
        if k is None:
            return None
        prefill = self._passes[k] == 0
        self._passes[k] += 1
        if prefill and hidden.shape[1] != self._mask.shape[1]:
            raise GuardrailError(
                f"prefill length {hidden.shape[1]} does not match the prompt "
                f"({self._mask.shape[1]} tokens); generate must run with the KV cache on"
            )
        if not prefill and hidden.shape[1] != 1:
            raise GuardrailError("decode step with more than one new token is not supported")
        shift = (self._prompt if prefill else self._decode)[k]
        if self._lockstep is not None:
            shift = self._with_live_shift(shift, hidden, k, prefill)
        return hidden - self._mask * shift if prefill else hidden - shift

    def _feed_references(self, embeds: torch.Tensor) -> torch.Tensor | None:
        self._embedding_passes += 1
        if self._lockstep is None or self._embedding_passes == 1:
            return None  # prefill: reference rows have their own prompts
        fed = embeds.clone()
        fed[self._lockstep.corrupted] = embeds[self._lockstep.main]
        fed[self._lockstep.text] = embeds[self._lockstep.main]
        return fed

    def _with_live_shift(self, shift: torch.Tensor, hidden: torch.Tensor, k: int,
                         prefill: bool) -> torch.Tensor:
        step = self._lockstep
        live = hidden[step.corrupted, -1] - hidden[step.text, -1]  # [J, hidden]
        if prefill and k == len(self._passes) - 1:
            self.live_norms = live.float().norm(dim=-1)
        increment = live
        if self._incremental and k > 0 and self._previous_live is not None:
            increment = live - self._previous_live
        self._previous_live = live
        return shift.index_add(0, step.main, (step.alpha * increment).unsqueeze(1))


class ChainedPlan:
    """Applies several plans in order (for example a correction, then a capture)."""

    def __init__(self, *plans: LayerPlan | None) -> None:
        self._plans = [plan for plan in plans if plan is not None]
        self.hooked = frozenset().union(*(plan.hooked for plan in self._plans))

    def on_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        replaced = None
        for plan in self._plans:
            result = plan.on_output(layer, hidden if replaced is None else replaced)
            replaced = result if result is not None else replaced
        return replaced
