"""Stop strings: generation ends where the text first contains one of them (pure).

The text is matched as it streams: `push` takes each new piece of detokenised text and returns
what may be shown now. Text that could still be the start of a stop string is held back until
the next piece decides it, so a client never sees part of a stop string; when one matches, the
text ends right before it (the stop string itself is not returned, as in OpenAI's API) and
every later piece is dropped. The same matcher runs in the router (on the cluster's stream)
and in the reference engine, so both end a request at the same token with the same text.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.model.detokenizer import IncrementalDetokenizer
from services.model.tokenizer import Tokenizer


class StopStrings:
    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._pending = ""  # text not yet returned: a possible start of a stop string
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> str:
        """The text that can be shown now (after a match: nothing more, ever)."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        pending = self._pending + text
        at, which = _first_match(pending, self.stop)
        if which is not None:
            self.matched, self._pending = which, ""
            return pending[:at]
        keep = _held_back(pending, self.stop, self._longest)
        self._pending = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        """The end of the stream: what was held back is shown (it matched nothing)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _first_match(text: str, stop: tuple[str, ...]) -> tuple[int, str | None]:
    """The earliest position any stop string starts at (the longest one there), or (-1, None)."""
    best, which = -1, None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best or (i == best and len(s) > len(which))):
            best, which = i, s
    return best, which


def _held_back(text: str, stop: tuple[str, ...], longest: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return n
    return 0


class StopText:
    """A sequence's text as it is generated, cut at its first stop string (the reference
    engine's side of stop strings; the router composes the same two parts in its stream)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int], stop: Iterable[str]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStrings(stop)
        self.pieces: list[str] = []

    def push(self, token_id: int) -> bool:
        """Add a generated token; True when the text now contains a stop string."""
        self.pieces.append(self.stops.push(self.detok.push(token_id)))
        return self.stops.stopped

    def text(self) -> str:
        """The whole text (ends the stream)."""
        self.pieces.append(self.stops.push(self.detok.flush()))
        self.pieces.append(self.stops.flush())
        return "".join(self.pieces)
