"""Loading a model's processor, with a slow-image-processor fallback when torchvision is missing.

Some processors (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) also hold a video processor, which needs
torchvision. Where torchvision is not installed (for example a CPU-only torch build with no
matching torchvision wheel), the processor is built from its tokenizer and its slow (PIL) image
processor, with no video support; a warning says so.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils.hub import cached_file

from guardrail.families import ModelFamily

if TYPE_CHECKING:
    from guardrail.backends.base import Processor

_log = logging.getLogger(__name__)


def load_processor(
    name_or_path: str, family: ModelFamily, revision: str | None = None
) -> Processor:
    """``AutoProcessor.from_pretrained``, or the image-only fallback described above."""
    try:
        processor: Processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        return processor
    except ImportError as e:
        if "torchvision" not in str(e).lower() or family.processor_class is None:
            raise
    _log.warning(
        "torchvision is not installed: the %s processor of %s uses its slow (PIL) image "
        "processor and has no video support",
        family.name,
        name_or_path,
    )
    return image_only_processor(name_or_path, family, revision)


def image_only_processor(
    name_or_path: str, family: ModelFamily, revision: str | None = None
) -> ProcessorMixin:
    """The family's processor built from its tokenizer and slow image processor, no video."""
    assert family.processor_class and family.image_processor_class
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    image_processor = _import(family.image_processor_class).from_pretrained(
        name_or_path, revision=revision
    )
    cls = without_video(_import(family.processor_class))
    accepted = inspect.signature(cls).parameters
    saved = _processor_config(name_or_path, revision)
    options = {k: v for k, v in saved.items() if k in accepted and k != "chat_template"}
    processor: ProcessorMixin = cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
        **options,
    )
    return processor


@cache
def without_video(cls: Any) -> Any:
    """A subclass of processor class ``cls`` that accepts ``video_processor=None``."""

    def check_argument_for_proper_class(self: Any, name: str, argument: Any) -> Any:
        if name == "video_processor" and argument is None:
            return None
        return cls.check_argument_for_proper_class(self, name, argument)

    return type(
        cls.__name__,
        (cls,),
        {
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "__doc__": f"{cls.__name__} without a video processor (torchvision is not installed).",
        },
    )


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _processor_config(name_or_path: str, revision: str | None) -> dict[str, Any]:
    path = cached_file(
        name_or_path,
        "processor_config.json",
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
    )
    return json.loads(Path(path).read_text()) if path else {}
