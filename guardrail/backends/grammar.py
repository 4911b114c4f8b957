"""Constrained decoding with xgrammar: one grammar matcher per constrained request."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
import xgrammar as xgr

from guardrail.constraints import JsonForm, OutputConstraint
from guardrail.tool_formats import HERMES, ToolCallFormat


class GrammarCompiler:
    """Compiles :class:`OutputConstraint` s for one tokenizer (compiled grammars are cached)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: set[int],
        tool_format: ToolCallFormat = HERMES,
    ) -> None:
        self._format = tool_format
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info)
        self._compiled: dict[OutputConstraint, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: OutputConstraint) -> xgr.CompiledGrammar:
        with self._lock:
            if constraint not in self._compiled:
                self._compiled[constraint] = self._compiler.compile_grammar(
                    _grammar(constraint, self._format)
                )
            return self._compiled[constraint]

    def matcher(self, constraint: OutputConstraint) -> RequestGrammar:
        """A fresh matcher for one request held to ``constraint``."""
        return RequestGrammar(self.compile(constraint), self.vocab_size)


def grammar_text(constraint: OutputConstraint, tool_format: ToolCallFormat = HERMES) -> str:
    """``constraint`` as EBNF text (for runtimes that compile grammars themselves, as vLLM's
    structured outputs do)."""
    return str(_grammar(constraint, tool_format))


def _grammar(constraint: OutputConstraint, tool_format: ToolCallFormat) -> xgr.Grammar:
    forms = [_form(_written(form, tool_format)) for form in constraint.forms]
    return forms[0] if len(forms) == 1 else xgr.Grammar.union(*forms)


def _written(form: JsonForm, tool_format: ToolCallFormat) -> JsonForm:
    """A tool-call form as the model's format writes one call."""
    if not form.tool_call or form.schema is None:
        return form
    spec = json.loads(form.schema)
    schema = json.dumps(tool_format.call_schema(spec["tools"], spec["name"]))
    return JsonForm(schema, tool_format.prefix, tool_format.suffix)


def _form(form: JsonForm) -> xgr.Grammar:
    # No free whitespace: a small model can otherwise pad its JSON with blanks forever.
    schema = form.schema if form.schema is not None else '{"type": "object"}'
    body = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    if form.prefix:
        body = xgr.Grammar.concat(_literal(form.prefix), body)
    if form.suffix:
        body = xgr.Grammar.concat(body, _literal(form.suffix))
    return body


def _literal(text: str) -> xgr.Grammar:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return xgr.Grammar.from_ebnf(f'root ::= "{escaped}"')


class RequestGrammar:
    """Holds one request's answer to its grammar, token by token."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, scores: torch.Tensor) -> None:
        """Set the scores (``[vocab]``) of tokens the grammar forbids next to -inf, in place."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        xgr.apply_token_bitmask_inplace(
            scores.unsqueeze(0),
            self._bitmask.to(scores.device),
            vocab_size=min(self.vocab_size, scores.shape[-1]),
        )

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar is complete (or refuses it)."""
        return bool(self._matcher.accept_token(token)) and not self._matcher.is_terminated()
