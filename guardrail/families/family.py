"""What the guard must know about one kind of vision-language model, as data."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from guardrail.errors import DecoderNotFoundError, UnknownModelFamilyError

ImageEntry = Literal["tokens", "cross-attention"]
ImageSizeRule = Literal["processor-size", "pixel-range", "longest-edge"]

# Arguments of a decoder layer that carry one entry per batch row (cut when reference rows are
# trimmed); a layer receiving another batch-sized argument is left whole.
TRIM_ARGUMENTS = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")
# Side of the corruption image for a text-only prompt when the processor does not fix one.
DEFAULT_SIDE = 336


@dataclass(frozen=True)
class ModelFamily:
    """How CMRM finds its way around one family of models.

    * ``model_types`` - the ``config.model_type`` values this family covers.
    * ``layers_path`` - dotted attribute path from the model to its text decoder layers; None
      means the model's own ``get_decoder().layers`` (or ``.text_model.layers``).
    * ``image_token_attributes`` - config attributes that may hold the image placeholder token id.
    * ``image_size_rule`` - how to size the corruption image of a prompt that has no image
      (an input image's corruption image always keeps that image's size, so that
      dynamic-resolution models see as many image tokens): ``processor-size`` (the processor's
      crop or resize size), ``pixel-range`` (Qwen2-VL: ``size`` holds a pixel-count range) or
      ``longest-edge`` (Idefics3: ``max_image_size``).
    * ``images_per_row`` - the processor takes one list of images per prompt (Gemma 3, Mllama).
    * ``trim_arguments`` - decoder-layer arguments with one entry per row (reference-row trim).
    * ``image_entry`` - ``tokens`` (image embeddings in the sequence) or ``cross-attention``
      (Mllama: text tokens attend to image states in dedicated layers).
    * ``processor_class`` / ``image_processor_class`` - for processors that need a video
      processor (and so torchvision): the import paths used to build one with the slow (PIL)
      image processor and no video support when torchvision is missing.
    * ``tool_call_format`` - how the family's chat models write tool calls: a name of
      :data:`guardrail.tool_formats.TOOL_FORMATS` (``hermes``, ``llama3_json``, ``mistral`` or
      one registered with ``register_tool_format``); None: Hermes, with a warning at load when
      the chat template takes tools.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str | None = None
    image_token_attributes: tuple[str, ...] = ("image_token_id", "image_token_index")
    image_size_rule: ImageSizeRule = "processor-size"
    images_per_row: bool = False
    trim_arguments: tuple[str, ...] = TRIM_ARGUMENTS
    image_entry: ImageEntry = "tokens"
    processor_class: str | None = None
    image_processor_class: str | None = None
    tool_call_format: str | None = None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The text decoder layers of ``model``; :class:`DecoderNotFoundError` if absent."""
        if self.layers_path is not None:
            found: Any = model
            for part in self.layers_path.split("."):
                found = getattr(found, part, None)
            candidates = [found]
        else:
            get_decoder = getattr(model, "get_decoder", None)
            decoder = get_decoder() if callable(get_decoder) else None
            candidates = [
                getattr(decoder, "layers", None),
                getattr(getattr(decoder, "text_model", None), "layers", None),
            ]
        for layers in candidates:
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
        where = self.layers_path or "get_decoder().layers"
        raise DecoderNotFoundError(
            f"{type(model).__name__} ({self.name} family) has no decoder layers at {where}; "
            "pass a ModelFamily with the right layers_path"
        )

    def image_token_id(self, config: Any) -> int:
        """The image placeholder token id from the model config."""
        for attribute in self.image_token_attributes:
            value = getattr(config, attribute, None)
            if isinstance(value, int):
                return value
        raise UnknownModelFamilyError(
            f"{type(config).__name__} has none of {list(self.image_token_attributes)}; pass a "
            "ModelFamily whose image_token_attributes names the image token id"
        )

    def image_layers(self, config: Any) -> tuple[int, ...]:
        """Decoder layers that only run when an image is present (cross-attention families)."""
        if self.image_entry != "cross-attention":
            return ()
        layers = getattr(config.get_text_config(), "cross_attention_layers", None)
        if not layers:
            raise UnknownModelFamilyError(
                f"{type(config).__name__} names no cross_attention_layers; the {self.name} "
                "family takes the image through cross-attention layers and must know them"
            )
        return tuple(int(layer) for layer in layers)

    def default_image_size(self, processor: Any) -> tuple[int, int]:
        """(width, height) of the corruption image for a prompt without an image."""
        image_processor = getattr(processor, "image_processor", None)
        if self.image_size_rule == "pixel-range":
            size = _as_dict(getattr(image_processor, "size", None))
            low = int(size.get("shortest_edge", getattr(image_processor, "min_pixels", 0)) or 0)
            high = int(size.get("longest_edge", getattr(image_processor, "max_pixels", 0)) or 0)
            pixels = DEFAULT_SIDE**2
            pixels = max(pixels, low) if low else pixels
            pixels = min(pixels, high) if high else pixels
            side = math.isqrt(pixels)
            return side, side
        if self.image_size_rule == "longest-edge":
            for attribute in ("max_image_size", "size"):
                size = _as_dict(getattr(image_processor, attribute, None))
                if "longest_edge" in size:
                    return int(size["longest_edge"]), int(size["longest_edge"])
            return DEFAULT_SIDE, DEFAULT_SIDE
        for attribute in ("crop_size", "size"):
            size = _as_dict(getattr(image_processor, attribute, None))
            if "height" in size and "width" in size:
                return int(size["width"]), int(size["height"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
        return DEFAULT_SIDE, DEFAULT_SIDE

    def resized_pixels(self, processor: Any, width: int, height: int) -> int:
        """An upper bound on the pixels of the image the processor resizes a ``width x height``
        image to, read off its size settings: within the maximum of a pixel-range resize
        (Qwen2-VL), within the square of a longest-edge one (Idefics3), the fixed size of a
        fixed one; a shortest-edge resize (CLIP) scales the short side up to its target, so a
        thin image grows with its aspect ratio. Unknown settings: the image's own size."""
        image_processor = getattr(processor, "image_processor", None)
        size = _as_dict(getattr(image_processor, "size", None))
        if self.image_size_rule == "pixel-range":
            high = size.get("longest_edge", getattr(image_processor, "max_pixels", None))
            return int(high) if high else width * height
        if self.image_size_rule == "longest-edge":
            for attribute in ("max_image_size", "size"):
                found = _as_dict(getattr(image_processor, attribute, None))
                if "longest_edge" in found:
                    return int(found["longest_edge"]) ** 2
            return width * height
        if "shortest_edge" in size:
            side = int(size["shortest_edge"])
            return math.ceil(side * side * max(width, height) / min(width, height))
        if "height" in size and "width" in size:
            return int(size["height"]) * int(size["width"])
        return width * height


def _as_dict(size: Any) -> Mapping[str, Any]:
    """Image processor sizes are dicts or ``SizeDict`` objects; None-valued fields dropped."""
    if size is None:
        return {}
    items = size.items() if isinstance(size, Mapping) else vars(size).items()
    return {key: value for key, value in items if value is not None}
