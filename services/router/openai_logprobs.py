"""A choice's `logprobs` object in OpenAI's two shapes, from the gRPC deltas (pure).

chat         {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
              "refusal": null}
completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}],
              "text_offset": [...]}   (offsets into the choice's text, as the tokens' own text
              adds up)

A token's text is its bytes decoded with U+FFFD for a partial character (`bytes` has them
exactly). Streaming sends each chunk's tokens; a whole response all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from services.protos_gen.epserve.v1 import inference_pb2


class ChoiceLogprobs:
    def __init__(self, chat: bool, token_bytes: Callable[[int], bytes]) -> None:
        self.chat, self.token_bytes = chat, token_bytes
        self._offset = 0  # completions' text_offset of the next token
        self._all: dict | None = None

    def _entry(self, token_id: int, logprob: float) -> dict:
        data = self.token_bytes(token_id)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(data)}

    def of(self, delta: inference_pb2.TokenDelta) -> dict | None:
        """The logprobs of one delta's tokens (None when the request asked for none)."""
        if not delta.logprobs:
            return None
        if self.chat:
            return {"content": [{**self._entry(t, lp.logprob), "top_logprobs": [
                self._entry(alt.token_id, alt.logprob) for alt in lp.top]}
                for t, lp in zip(delta.token_ids, delta.logprobs, strict=True)],
                "refusal": None}
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(delta.token_ids, delta.logprobs, strict=True):
            text = self._entry(t, lp.logprob)["token"]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            top: dict[str, float] = {}
            for alt in lp.top:  # two ids of one text: the likelier one's logprob
                top.setdefault(self._entry(alt.token_id, 0.0)["token"], alt.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out

    def add(self, delta: inference_pb2.TokenDelta) -> None:
        """Collect one delta's tokens for the whole response."""
        part = self.of(delta)
        if part is None:
            return
        if self._all is None:
            self._all = part
            return
        for key, values in part.items():
            if key != "refusal":
                self._all[key].extend(values)

    def whole(self, asked: bool) -> dict | None:
        if not asked:
            return None
        if self._all is None:  # asked for, but no token came (cannot happen for max_tokens>0)
            return {"content": [], "refusal": None} if self.chat else {
                "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return self._all
