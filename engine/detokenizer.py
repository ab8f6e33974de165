"""Streaming detokenization: text that is safe to show now, whole characters only, cut at stop strings.

Decoding follows vLLM's prefix/read offsets: each step decodes a short window of recent tokens twice (up to
the last emitted token, and up to the newest) and emits the difference, so the cost per token stays flat and
a tokenizer that drops a window's leading space (sentencepiece) does so in both decodes alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from diptych.engine.tokenizer import Tokenizer

# Prompt tokens the first window starts with: enough context for the first output token's leading space.
_PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"  # what a decode ends with while a UTF-8 character still lacks its last bytes


class IncrementalDetokenizer:
    """One request's output ids, turned into text as it becomes safe to send."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(s for s in stop if s)
        # The decode window: ids[:read] are already emitted and give context, ids[read:] are not yet.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read = len(self._ids)
        self._held = ""  # decoded text that may be the start of a stop string
        self._parts: list[str] = []
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new tokens; return the text they make safe to emit (possibly empty)."""
        if self._stopped:
            return ""
        new = []
        for token_id in token_ids:
            self._ids.append(token_id)
            new.append(self._decode_step())
        return self._release("".join(new), final=False)

    def flush(self) -> str:
        """At the end of the sequence: emit what was held back, up to a stop string if one completes."""
        if self._stopped:
            return ""
        prefix_text, full_text = self._decode_window()
        self._advance()
        return self._release(full_text[len(prefix_text) :], final=True)

    def _decode_window(self) -> tuple[str, str]:
        """(text of the context ids, text of the whole window)."""
        context = self._tokenizer.decode(self._ids[: self._read], self._skip_special)
        return context, self._tokenizer.decode(self._ids, self._skip_special)

    def _decode_step(self) -> str:
        prefix_text, full_text = self._decode_window()
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""  # nothing visible yet, or half a character: wait for the next token
        self._advance()
        return full_text[len(prefix_text) :]

    def _advance(self) -> None:
        """The unread ids are now emitted: they become the next window's context; older ids are dropped."""
        del self._ids[: self._read]
        self._read = len(self._ids)

    def _release(self, new_text: str, final: bool) -> str:
        text = self._held + new_text
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if found:
            self._stopped, self._held = True, ""
            return self._emit(text[: min(found)])
        keep = 0 if final else self._stop_prefix_length(text)
        self._held = text[len(text) - keep :]
        return self._emit(text[: len(text) - keep])

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of text that some stop string starts with (that much is undecided)."""
        longest = min(len(text), max((len(s) - 1 for s in self._stops), default=0))
        for n in range(longest, 0, -1):
            if any(s.startswith(text[-n:]) for s in self._stops):
                return n
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text
