"""Checks a decode instance's token stream: seq 0, 1, 2, ... with no gap or duplicate (pure).

A gap or a repeat means a token was lost or replayed (a bug, or a re-drive gone wrong); the
text would then be silently wrong, so the request fails loudly instead.
"""

from __future__ import annotations


class SequenceError(RuntimeError):
    """The decode stream broke its sequence contract."""


class TokenSequenceChecker:
    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.received = 0  # the next expected seq

    def accept(self, seq: int, token_id: int) -> None:
        if seq < self.received:
            raise SequenceError(f"duplicate token seq {seq} (already have 0..{self.received - 1})")
        if seq > self.received:
            raise SequenceError(f"gap in the token stream: expected seq {self.received}, "
                                f"got {seq}")
        if self.max_tokens is not None and seq >= self.max_tokens:
            raise SequenceError(f"token seq {seq} beyond max_tokens {self.max_tokens}")
        if token_id < 0:
            raise SequenceError(f"negative token id {token_id} at seq {seq}")
        self.received += 1

    def check_finished(self, completion_tokens: int) -> None:
        """The decode instance's count must match what arrived."""
        if completion_tokens != self.received:
            raise SequenceError(f"decode finished with completion_tokens={completion_tokens} "
                                f"but {self.received} tokens arrived")
