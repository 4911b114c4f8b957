"""Constrained decoding with xgrammar: one grammar matcher per constrained request row."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from guardrail.constraints import JsonForm, OutputConstraint


class GrammarCompiler:
    """Compiles :class:`OutputConstraint` s for one tokenizer (compiled grammars are cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
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
                self._compiled[constraint] = self._compiler.compile_grammar(_grammar(constraint))
            return self._compiled[constraint]

    def processor(self, constraints: Mapping[int, OutputConstraint]) -> RowGrammars:
        """A logits processor constraining the batch rows named in ``constraints`` only."""
        return RowGrammars(
            {row: self.compile(constraint) for row, constraint in constraints.items()},
            self.vocab_size,
        )


def _grammar(constraint: OutputConstraint) -> xgr.Grammar:
    forms = [_form(form) for form in constraint.forms]
    return forms[0] if len(forms) == 1 else xgr.Grammar.union(*forms)


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


class RowGrammars(LogitsProcessor):
    """Masks the logits of some batch rows to what their grammar allows next; other rows
    (unconstrained requests, and CMRM's reference rows, which are fed their request's tokens)
    are left alone. Single use: one per ``generate`` call."""

    def __init__(self, compiled: Mapping[int, xgr.CompiledGrammar], vocab_size: int) -> None:
        self.matchers = {row: xgr.GrammarMatcher(grammar) for row, grammar in compiled.items()}
        self.vocab_size = vocab_size
        self._bitmask: torch.Tensor | None = None
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(input_ids.shape[0], self.vocab_size)
        if self._started:
            for row, matcher in list(self.matchers.items()):
                accepted = matcher.accept_token(int(input_ids[row, -1]))
                if not accepted or matcher.is_terminated():
                    del self.matchers[row]  # finished: the row stopped or now only pads
        self._started = True
        if not self.matchers:
            return scores
        xgr.reset_token_bitmask(self._bitmask)
        for row, matcher in self.matchers.items():
            matcher.fill_next_token_bitmask(self._bitmask, row)
        xgr.apply_token_bitmask_inplace(
            scores,
            self._bitmask.to(scores.device),
            vocab_size=min(self.vocab_size, scores.shape[-1]),
            indices=sorted(self.matchers),
        )
        return scores
