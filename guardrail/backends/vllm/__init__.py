"""The guard on vLLM (``pip install cmrm-guardrail[vllm]``): :class:`VLLMBackend` runs dataset-
and sample-level CMRM inside vLLM's continuous batching, through a worker extension."""

from guardrail.backends.vllm.backend import ENGINE_DEFAULTS, EXTENSION, VLLMBackend
from guardrail.backends.vllm.session import VLLMBatch

__all__ = ["ENGINE_DEFAULTS", "EXTENSION", "VLLMBackend", "VLLMBatch"]
