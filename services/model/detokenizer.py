"""Incremental detokenization for streaming: token ids in, completed text out.

A byte-level token may end in the middle of a multi-byte UTF-8 character (an emoji is often
split over two or three tokens). The detokenizer keeps each token's bytes and emits text only
once the bytes form whole characters, so a client never sees half a character. Invalid bytes
become U+FFFD exactly as `Tokenizer.decode` replaces them, so the concatenation of every delta
and the final flush equals `Tokenizer.decode` of all the ids pushed. An id past the
tokenizer's vocabulary (config.json's vocab_size pads past it) adds no bytes, so it neither
fails the stream nor breaks a character that spans it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from services.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Iterable[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Python's incremental UTF-8 decoder holds back an unfinished character and replaces
        # invalid bytes by maximal subparts, as the Rust tokenizer's lossy decode does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._flushed = False
        # The prompt's text is the client's already; feeding it only matters when the prompt
        # ends inside a character that the first generated token completes.
        for token_id in prompt_ids or ():
            self.push(token_id)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        if self._flushed:
            raise RuntimeError("push after flush: this detokenizer's stream has ended")
        data = self._tokenizer.token_bytes(token_id)
        if self._skip_special_tokens and token_id in self._tokenizer.special_ids:
            return ""
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """End the stream; bytes of an unfinished character come out as U+FFFD."""
        if self._flushed:
            return ""
        self._flushed = True
        return self._utf8.decode(b"", final=True)
