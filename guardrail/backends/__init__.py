"""Model runtimes the engine runs on: the :class:`Backend` protocol and its implementations."""

from guardrail.backends.base import Backend, Inputs, Processor
from guardrail.backends.transformers import TransformersBackend

__all__ = ["Backend", "Inputs", "Processor", "TransformersBackend"]
