"""Incremental detokenization for streamed answers: each step decodes a short window of the last tokens, not the whole
answer, so a token costs the same at position 10 and at position 2,000.

The method is TGI's `decode_token` and vLLM's `detokenize_incrementally`: keep two offsets into the token list,
`prefix` (where the window starts: the tokens of the text given the step before, for context) and `read` (where the
text given so far ends). A step decodes `tokens[prefix:read]` and `tokens[prefix:]`; the new text is the second past
the first. Decoding with one earlier piece as context keeps what a tokenizer does at word starts (SentencePiece's
leading space, byte-level BPE merges) as the whole-answer decode does. While the window's text ends in U+FFFD (a UTF-8
character whose bytes are still coming) nothing is given, and the window grows until the character completes.
"""

from __future__ import annotations


INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """
    The text of a growing list of token ids, piece by piece.

    Args:
        tokenizer: a Hugging Face tokenizer (its `decode`).
        skip_special_tokens (`bool`): as `tokenizer.decode`'s (special tokens add no text).

    `push(ids)` adds tokens and returns the text they complete ("" while a character is incomplete or the tokens are
    special); `flush()` returns what is held back, as the whole decode ends. The pieces joined equal
    `tokenizer.decode(all_ids, skip_special_tokens=...)` for byte-level BPE and SentencePiece tokenizers.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = self.read = 0

    def push(self, ids: list[int]) -> str:
        """Adds `ids`; returns the new text they complete."""
        self.tokens.extend(ids)
        given, window = self._decode(self.prefix, self.read), self._decode(self.prefix, len(self.tokens))
        if len(window) <= len(given) or window.endswith(INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return window[len(given) :]

    def flush(self) -> str:
        """The text held back (an incomplete character comes out as U+FFFD, as `decode` gives it)."""
        given, window = self._decode(self.prefix, self.read), self._decode(self.prefix, len(self.tokens))
        self.prefix = self.read = len(self.tokens)
        return window[len(given) :]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=self.skip_special_tokens)


__all__ = ["IncrementalDetokenizer"]
