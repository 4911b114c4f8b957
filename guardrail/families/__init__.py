"""Model families the guard knows, and how a model is matched to one.

Add a family by appending a :class:`ModelFamily` to :data:`FAMILIES`, or pass one to
``GuardedVLM.from_pretrained(..., family=...)`` for a model no family covers.
"""

from __future__ import annotations

from typing import Any

from guardrail.errors import UnknownModelFamilyError
from guardrail.families.family import TRIM_ARGUMENTS, ImageEntry, ModelFamily

_QWEN_PIL = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil"

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("llava", ("llava",)),
    ModelFamily("llava_next", ("llava_next",)),
    ModelFamily(
        "llava_onevision",
        ("llava_onevision",),
        processor_class="transformers.LlavaOnevisionProcessor",
        image_processor_class="transformers.models.llava_onevision."
        "image_processing_pil_llava_onevision.LlavaOnevisionImageProcessorPil",
    ),
    ModelFamily(
        "qwen2_vl",
        ("qwen2_vl",),
        image_size_rule="pixel-range",
        processor_class="transformers.Qwen2VLProcessor",
        image_processor_class=_QWEN_PIL,
        tool_call_format="hermes",
    ),
    ModelFamily(
        "qwen2_5_vl",
        ("qwen2_5_vl",),
        image_size_rule="pixel-range",
        processor_class="transformers.Qwen2_5_VLProcessor",
        image_processor_class=_QWEN_PIL,
        tool_call_format="hermes",
    ),
    ModelFamily("gemma3", ("gemma3",), images_per_row=True),
    ModelFamily("idefics3", ("idefics3",), image_size_rule="longest-edge"),
    ModelFamily(
        "mllama",
        ("mllama",),
        images_per_row=True,
        image_entry="cross-attention",
        tool_call_format="llama3_json",
        trim_arguments=(
            *TRIM_ARGUMENTS,
            "cross_attention_states",
            "cross_attention_mask",
            "full_text_row_masked_out_mask",
        ),
    ),
)


def family_named(name: str) -> ModelFamily:
    """The known family called ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnknownModelFamilyError(
        f"no model family named {name!r}; known: {', '.join(f.name for f in FAMILIES)}"
    )


def family_for(config: Any) -> ModelFamily:
    """The family of a model config (by ``model_type``); a typed error when none fits."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnknownModelFamilyError(
        f"no model family covers model_type {model_type!r}; known: "
        f"{', '.join(t for f in FAMILIES for t in f.model_types)}. Pass "
        "family=ModelFamily(name=..., model_types=(...,)) naming its decoder layers "
        "(layers_path), image token (image_token_attributes) and corruption image size "
        "(image_size_rule), or family='llava' to treat it as a known family"
    )


__all__ = ["FAMILIES", "ImageEntry", "ModelFamily", "family_for", "family_named"]
