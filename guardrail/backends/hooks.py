"""Forward hooks on decoder layers: capture of hidden states and the CMRM correction.

Hooks are installed while at least one call is running and removed when the last one ends (also on
exceptions and cancellation). Each hook dispatches to the *plan* of the calling thread or task
through a :class:`~contextvars.ContextVar`, so concurrent calls on one model never see each other's
correction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from guardrail.errors import GuardrailError
from guardrail.families.family import TRIM_ARGUMENTS


class LayerPlan(Protocol):
    """What to do with each decoder layer's output during one forward or ``generate`` call.

    ``hooked`` names the layers the plan needs to see; only those get a
    hook, so layers a plan does not touch cost nothing per step.
    """

    hooked: frozenset[int]
    trim: RowTrim | None

    def on_output(
        self, layer: int, hidden: torch.Tensor, layer_input: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Return a replacement for ``hidden`` (``[batch, seq, hidden]``, the layer's output;
        ``layer_input`` is what went in), or None to keep it."""
        ...


_ACTIVE: ContextVar[tuple[int, LayerPlan] | None] = ContextVar("cmrm_plan", default=None)
_log = logging.getLogger(__name__)
_UNTRIMMED_LAYERS: set[str] = set()  # layer classes already warned about


TrimState = Literal["pending", "on", "off"]


class RowTrim:
    """Rows ``keep`` onwards are reference rows needed only up to layer ``after``.

    Decoder layers past ``after`` and the LM head then run on the first ``keep`` rows only; the
    head's output is padded back with zero logits for the reference rows (which generate nothing:
    they are fed the request rows' tokens). Exact for the request rows: attention never mixes rows.
    Whether the layers can be trimmed is decided once, at the first trimmed layer of the prefill
    (``state``): a layer that gets a batch-sized argument this module does not know is left whole,
    for the whole call, so that the KV cache stays consistent.
    """

    def __init__(
        self,
        after: int,
        keep: int,
        total: int,
        arguments: Sequence[str] = TRIM_ARGUMENTS,
        state: TrimState = "pending",
    ) -> None:
        self.after, self.keep, self.total = after, keep, total
        self.arguments = frozenset(arguments)  # the layer arguments known to be per row
        self.state: TrimState = state  # decided at the first trimmed layer of a model's prefill
        self.reason = ""

    def layer_inputs(
        self, layer: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Arguments of a decoder layer past ``after``, cut to the request rows."""
        if self.state == "pending":
            unknown = [
                name
                for name, value in kwargs.items()
                if name not in self.arguments and self._batched(value)
            ]
            if len(args) > 1 or unknown:
                self.state = "off"
                self.reason = f"{layer} takes batch-sized arguments {unknown or args[1:]!r}"
                if layer not in _UNTRIMMED_LAYERS:
                    _UNTRIMMED_LAYERS.add(layer)
                    _log.warning("reference rows run through every layer: %s", self.reason)
            else:
                self.state = "on"
        if self.state == "off":
            return None
        cut = {
            name: self._rows(value) if name in self.arguments else value
            for name, value in kwargs.items()
        }
        return tuple(self._rows(arg) for arg in args), cut

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[: self.keep]

    def head_output(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != self.keep:
            return logits
        padding = logits.new_zeros((self.total - self.keep, *logits.shape[1:]))
        return torch.cat([logits, padding])

    def _per_row(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.total

    def _batched(self, value: object) -> bool:
        if isinstance(value, tuple | list):
            return any(self._batched(v) for v in value)
        return self._per_row(value)

    def _rows(self, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(self._rows(v) for v in value)
        return value[: self.keep] if self._per_row(value) else value


_HookKey = tuple[str, int]  # ("out" | "pre", layer index) or ("head", 0)


class DecoderHooks:
    """Installs dispatching hooks on decoder layers and the LM head while plans that need them
    are active; each hook is reference-counted across concurrent calls."""

    def __init__(
        self, layers: Sequence[nn.Module] | nn.ModuleList, head: nn.Module | None = None
    ) -> None:
        self._modules = dict(enumerate(layers))
        self._num_layers = len(layers)
        self._head = head
        self._lock = threading.Lock()
        self._users: dict[_HookKey, int] = {}
        self._handles: dict[_HookKey, list[torch.utils.hooks.RemovableHandle]] = {}

    def _keys(self, plan: LayerPlan) -> list[_HookKey]:
        keys = [("out", index) for index in plan.hooked]
        if plan.trim is not None:
            keys += [("pre", index) for index in range(plan.trim.after + 1, self._num_layers)]
            keys += [("head", 0)] if self._head is not None else []
        return keys

    @contextmanager
    def activate(self, plan: LayerPlan) -> Iterator[None]:
        """Run the body with ``plan`` applied to this thread's (or task's) forward passes."""
        token = _ACTIVE.set((id(self), plan))
        keys = self._keys(plan)
        with self._lock:
            for key in keys:
                if self._users.get(key, 0) == 0:
                    self._handles[key] = self._install(key)
                self._users[key] = self._users.get(key, 0) + 1
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            with self._lock:
                for key in keys:
                    self._users[key] -= 1
                    if self._users[key] == 0:
                        for handle in self._handles.pop(key):
                            handle.remove()

    def _plan(self) -> LayerPlan | None:
        active = _ACTIVE.get()
        return active[1] if active is not None and active[0] == id(self) else None

    def _install(self, key: _HookKey) -> list[torch.utils.hooks.RemovableHandle]:
        kind, index = key
        if kind == "out":
            module = self._modules[index]
            return [module.register_forward_hook(self._output_hook(index), with_kwargs=True)]
        if kind == "pre":
            module = self._modules[index]
            return [
                module.register_forward_pre_hook(
                    self._trim_hook(type(module).__name__), with_kwargs=True
                )
            ]
        assert self._head is not None  # head keys exist only when there is a head
        return [
            self._head.register_forward_pre_hook(self._head_input_hook),
            self._head.register_forward_hook(self._head_output_hook),
        ]

    def _output_hook(self, index: int) -> Callable[[nn.Module, Any, Any, Any], Any]:
        def hook(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            plan = self._plan()
            if plan is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            layer_input = args[0] if args else kwargs.get("hidden_states")
            replaced = plan.on_output(index, hidden, layer_input)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return hook

    def _trim_hook(self, layer: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            plan = self._plan()
            if plan is None or plan.trim is None:
                return None
            return plan.trim.layer_inputs(layer, args, kwargs)

        return hook

    def _head_input_hook(self, _module: nn.Module, args: tuple[Any, ...]) -> Any:
        plan = self._plan()
        if plan is None or plan.trim is None:
            return None
        return (plan.trim.head_input(args[0]), *args[1:])

    def _head_output_hook(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> Any:
        plan = self._plan()
        if plan is None or plan.trim is None:
            return None
        return plan.trim.head_output(output)


class CapturePlan:
    """Records hidden states at the last ``span`` positions of each layer up to the deepest
    wanted one.

    A layer that did not run passed its input through (Mllama skips its cross-attention layers
    when no row has an image), so its state is the nearest earlier layer's.
    """

    def __init__(self, layers: Sequence[int], span: int = 1) -> None:
        self.hooked = frozenset(range(max(layers) + 1))
        self.trim: RowTrim | None = None
        self._span = span
        self.states: dict[int, torch.Tensor] = {}

    def on_output(
        self, layer: int, hidden: torch.Tensor, layer_input: torch.Tensor | None = None
    ) -> None:
        if layer in self.hooked:
            self.states[layer] = hidden[:, -self._span :, :].float()

    def state(self, layer: int) -> torch.Tensor:
        """``[batch, span, hidden]`` float32 output of ``layer``."""
        ran = [index for index in self.states if index <= layer]
        if not ran:
            raise GuardrailError(f"no decoder layer up to {layer} ran; nothing to capture")
        return self.states[max(ran)]

    def stacked(self, layers: Sequence[int]) -> torch.Tensor:
        """States as ``[len(layers), batch, span, hidden]`` float32."""
        return torch.stack([self.state(layer) for layer in layers])


@dataclass(frozen=True)
class Lockstep:
    """Sample-level rows computed inside the same batched pass.

    Row ``main[j]`` is corrected with the live difference of its reference rows ``corrupted[j]``
    (the prompt with the meaningless image) and ``text[j]`` (the prompt without image), scaled by
    ``alpha[j]``. The runner feeds the reference rows the main row's new token at every decode
    step, so the shift is measured at each generated position, not extrapolated from the prompt.
    """

    main: torch.Tensor  # [J] long
    corrupted: torch.Tensor  # [J] long
    text: torch.Tensor  # [J] long
    alpha: torch.Tensor  # [J, 1] in the model dtype


class CorrectionPlan:
    """Subtracts a per-row shift at chosen layers, for one forward pass: ``h ← h − shift[row]``.

    ``shifts[k]`` (``[batch, hidden]``, already scaled by each row's α, zero for rows without a
    stored shift) applies at ``layers[k]``: at the positions of ``prefill_mask`` (``[batch, seq]``)
    in a prefill pass, or at the one new position of a decode step (``prefill_mask`` None). With
    ``lockstep``, live sample-level shifts are added for its rows. With ``incremental``, a layer's
    live shift is its difference to the previous edited layer's. With ``trim``, the reference rows
    stop after the deepest edited layer.
    """

    def __init__(
        self,
        layers: Sequence[int],
        shifts: torch.Tensor,
        prefill_mask: torch.Tensor | None = None,
        lockstep: Lockstep | None = None,
        incremental: bool = True,
        trim: RowTrim | None = None,
    ) -> None:
        self._slot = {layer: k for k, layer in enumerate(layers)}
        self.trim = trim
        self.hooked = frozenset(self._slot)
        self._shifts = shifts.unsqueeze(2)  # [K, batch, 1, hidden]
        self._mask = (
            None if prefill_mask is None else prefill_mask.to(shifts.dtype).unsqueeze(-1)
        )  # [batch, seq, 1]
        self._lockstep = lockstep
        self._incremental = incremental
        self._previous_live: torch.Tensor | None = None
        self.live_norms: torch.Tensor | None = None  # ‖Δ‖ of lockstep rows at the prompt

    def on_output(
        self, layer: int, hidden: torch.Tensor, layer_input: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        k = self._slot.get(layer)
        if k is None:
            return None
        if self._mask is not None and hidden.shape[1] != self._mask.shape[1]:
            raise GuardrailError(
                f"prefill length {hidden.shape[1]} does not match the prompt "
                f"({self._mask.shape[1]} tokens)"
            )
        if self._mask is None and hidden.shape[1] != 1:
            raise GuardrailError("decode step with more than one new token is not supported")
        shift = self._shifts[k]
        if self._lockstep is not None:
            shift = self._with_live_shift(shift, hidden, k)
        return hidden - shift if self._mask is None else hidden - self._mask * shift

    def _with_live_shift(self, shift: torch.Tensor, hidden: torch.Tensor, k: int) -> torch.Tensor:
        step = self._lockstep
        assert step is not None
        live = hidden[step.corrupted, -1] - hidden[step.text, -1]  # [J, hidden]
        if self._mask is not None and k == len(self._slot) - 1:
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
        self.trim = next((plan.trim for plan in self._plans if plan.trim is not None), None)

    def on_output(
        self, layer: int, hidden: torch.Tensor, layer_input: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        replaced = None
        for plan in self._plans:
            result = plan.on_output(layer, hidden if replaced is None else replaced, layer_input)
            replaced = result if result is not None else replaced
        return replaced


class PassThrough:
    """Rows without an image go through ``layers`` unchanged.

    A model whose image enters through cross-attention layers (Mllama) skips those layers when
    no row of the batch has an image, but runs them for every row otherwise, and an image-free
    row then still picks up a contribution. Restoring the layer input for those rows gives them
    exactly what they get on their own, so a text-only row in a mixed batch (a text-only request,
    or the text-only reference row of sample level) is computed as a text-only call.
    """

    def __init__(self, layers: Sequence[int], rows: torch.Tensor) -> None:
        self.hooked = frozenset(layers)
        self.trim: RowTrim | None = None
        self._rows = rows.view(-1, 1, 1)  # [batch, 1, 1] bool: rows without an image

    def on_output(
        self, layer: int, hidden: torch.Tensor, layer_input: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if layer not in self.hooked:
            return None
        if layer_input is None or layer_input.shape != hidden.shape:
            raise GuardrailError(f"decoder layer {layer} did not show its input to the guard")
        return torch.where(self._rows[: hidden.shape[0]], layer_input, hidden)
