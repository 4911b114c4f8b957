"""Guard configuration (pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrail.errors import InvalidInputError

Mode = Literal["auto", "dataset", "sample", "off"]
Positions = Literal["all", "text", "last"]
Stacking = Literal["incremental", "independent"]
# Default edited layer: 5/6 of the depth (docs/defaults.md has the measurement behind it).
DEFAULT_DEPTH = (5, 6)


class CorruptionSpec(BaseModel):
    """The meaningless image ``img'`` of the shift ``Δ = h(x, img') − h(x)``."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["blank", "noise"] = "blank"
    seed: int = 0

    @property
    def tag(self) -> str:
        """Stable text form, used in shift metadata and store keys."""
        return "blank" if self.kind == "blank" else f"noise-seed{self.seed}"


class GuardConfig(BaseModel):
    """How CMRM corrects a multimodal call.

    * ``alpha`` - strength: the corrected state is ``h − alpha·Δ``; 0 leaves the model untouched.
    * ``layers`` - decoder layers to edit (negative indices count from the end); None means one
      layer at five sixths of the decoder's depth (layer 25 of 30, 26 of 32).
    * ``positions`` - which token positions are edited: ``last`` (the last prompt token and every
      generated token), ``text`` (every non-image token and every generated token) or ``all``.
    * ``stacking`` - with several edited layers, ``incremental`` subtracts at each layer only the
      shift added since the previous edited layer (per-layer shifts are cumulative along the
      residual stream); ``independent`` subtracts each layer's full shift, as written in the paper.
    * ``mode`` - ``dataset`` (cached vector), ``sample`` (two reference passes per call),
      ``auto`` (dataset when one is loaded, else sample) or ``off``.
    * ``on_unavailable`` - when the guard cannot apply: ``fail_closed`` raises
      :class:`~guardrail.errors.GuardUnavailableError`; ``unguarded`` answers without the guard and
      says so in the decision record.
    * ``trim_references`` - sample level: run the two reference rows only up to the deepest edited
      layer (later layers and the LM head skip them). Exact; off only to measure what it saves.
    * ``max_image_pixels`` - the pixel budget of one input image: larger ones are refused from
      their header before decoding (JPEGs are decoded at a reduced scale when that fits).
    * ``check_plausibility`` - before a stored dataset-level shift is first used, compare it
      with a live measurement on a few anchor prompts and refuse it when it is not this
      model's shift (see ``guardrail.plausibility``).
    * ``sample_level_with_tools`` - in ``auto`` mode, a request that offers tools runs at sample
      level: a dataset-level shift calibrated on prompts without tools removes much less of the
      image's shift from prompts with them (``bench/tools_shift.py``, bench/RESULTS.md). Turn it
      off if your dataset-level shift was calibrated on prompts with your tools.
    * ``max_images``, ``max_prompt_tokens``, ``max_json_depth``, ``max_image_aspect_ratio``,
      ``max_resized_pixels`` - input limits, checked before any model work: images per request;
      text tokens of the conversation and its tools (None: the model's context length); nesting
      of messages, tool calls and schemas; longest side over shortest side of an image; and the
      pixels of an image once the model's processor has resized it (a shortest-edge resize
      enlarges a thin image: 2000x1 becomes 225 million pixels for LLaVA-1.5's CLIP).
    * ``shift_calibration_id`` - pin the dataset-level shift to one calibration (the id that
      ``guardrail calibrate`` prints): a stored vector of any other calibration, even one
      signed with the deployment's key, is refused. Without a pin, a signed store refuses an
      older calibration than one the process has already used, but not at a fresh start.

    The default layer and positions come from the measurement in ``docs/defaults.md``.
    """

    model_config = ConfigDict(frozen=True)

    alpha: float = Field(default=1.0, ge=0.0, le=10.0)
    layers: tuple[int, ...] | None = None
    positions: Positions = "last"
    stacking: Stacking = "incremental"
    corruption: CorruptionSpec = CorruptionSpec()
    mode: Mode = "auto"
    on_unavailable: Literal["fail_closed", "unguarded"] = "fail_closed"
    trim_references: bool = True
    check_plausibility: bool = True
    sample_level_with_tools: bool = True
    max_image_pixels: int = Field(default=16_000_000, ge=1)
    max_images: int = Field(default=16, ge=0)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    max_json_depth: int = Field(default=64, ge=2)
    max_image_aspect_ratio: float = Field(default=20.0, ge=1.0)
    max_resized_pixels: int = Field(default=16_000_000, ge=1)
    shift_calibration_id: str | None = None

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The configured layers of a ``num_layers`` decoder, as sorted non-negative indices."""
        n = num_layers
        if self.layers is None:
            return (DEFAULT_DEPTH[0] * n // DEFAULT_DEPTH[1],)
        indices = sorted({i % n for i in self.layers if -n <= i < n})
        if len(indices) != len(set(self.layers)) or not indices:
            raise InvalidInputError(f"layers {list(self.layers)} out of range for {n} layers")
        return tuple(indices)


def fold_guard_fields(values: Any, into: str = "guard") -> Any:
    """Keyword arguments with :class:`GuardConfig` fields given flat (``alpha=0.8``) moved into
    the nested ``into`` config, so that every guard setting reaches a front end by one name."""
    if not isinstance(values, dict):
        return values
    flat = {k: values.pop(k) for k in list(values) if k in GuardConfig.model_fields}
    if flat:
        guard = values.get(into) or GuardConfig()
        base = guard.model_dump() if isinstance(guard, GuardConfig) else dict(guard)
        values[into] = GuardConfig.model_validate({**base, **flat})
    return values
