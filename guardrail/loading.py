"""Finding what CMRM needs inside a transformers model and its processor."""

from __future__ import annotations

from typing import Any

from torch import nn

from guardrail.errors import DecoderNotFoundError


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model``, found through its own ``get_decoder()`` API."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for candidate in (decoder, getattr(decoder, "text_model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise DecoderNotFoundError(
        f"{type(model).__name__} exposes no decoder layers through get_decoder(); "
        "CMRM needs the text decoder's layer list"
    )


def default_image_size(processor: Any) -> tuple[int, int]:
    """(width, height) the processor's image side expects; 336 x 336 when it does not say."""
    image_processor = getattr(processor, "image_processor", None)
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None) or {}
        if "height" in size and "width" in size:
            return int(size["width"]), int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return 336, 336
