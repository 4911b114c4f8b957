"""Tokens to text deltas for one streamed answer: stop strings and tool-call hold-back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Decodes a growing answer and releases only text that is final.

    Text that could still become a stop string stays held back; once a stop string appears,
    the answer ends just before it (``stopped``). Everything from a tool-call marker on is held
    (tool calls are sent whole once parsed). Multi-byte characters are released once complete.
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), hold_from: Sequence[str] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold_from = [m for m in hold_from if m]
        self._keep = max((len(s) for s in [*self._stop, *self._hold_from]), default=1) - 1
        self._tokens: list[int] = []
        self.text = ""  # the answer so far, cut at a stop string
        self.released = 0  # characters of ``text`` already released
        self.stopped = False

    def feed(self, token: int) -> str:
        """Add one token; the text that became final."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        cuts = [text.index(s) for s in self._stop if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        if text.endswith("\ufffd") and not self.stopped:
            return ""  # maybe a character split over tokens: wait for the rest
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The text held back at the end of the answer."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = [self.text.find(m, self.released) for m in self._hold_from]
        starts = [i for i in held if i >= 0]
        # without a marker, one may begin in the tail: release only up to where it could start
        end = min(starts) if starts else len(self.text) if final else self._safe_end()
        out, self.released = self.text[self.released : end], max(self.released, end)
        return out

    def _safe_end(self) -> int:
        for start in range(max(self.released, len(self.text) - self._keep), len(self.text)):
            tail = self.text[start:]
            if any(m.startswith(tail) for m in [*self._stop, *self._hold_from]):
                return start
        return len(self.text)
