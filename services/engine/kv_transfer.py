"""Latent-KV transfer between prefill and decode: chunked bytes with a sha256, fail closed.

A sequence's latent KV [layers, tokens, latent_dim] travels as raw bytes in chunks of at most
`chunk_bytes`. The receiver checks names, order, sizes, shape and checksum before a single
value reaches its cache: any mismatch raises TransferError and nothing is installed. The
checksum covers the header too (request id, dtype, shape, first token, size, and the first
token's logprobs when the request asked for them): a flipped first token or shape is caught like
flipped KV bytes. A prefill that ran the MTP draft layer appends that layer's KV of the prompt
(a DraftKV) after the prompt's, its position and first draft in the header.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from services.common.errors import StatusError
from services.engine.sampling import TokenLogprobs
from services.engine.sampling_proto import logprobs_from_proto, logprobs_to_proto
from services.engine.tensor_proto import dtype_from_proto, dtype_to_proto
from services.engine.wire import WireError, WireTensor, decode, encode
from services.protos_gen.epserve.v1 import serving_pb2

CHUNK_BYTES = 1 << 20


class TransferError(StatusError):
    """A KV transfer that cannot be installed; nothing of it reached the cache."""


@dataclass(frozen=True)
class DraftKV:
    """The MTP draft layer's latent KV of prompt positions start .. start + n - 1 ([1, n,
    latent_dim]) and its draft of the token after token 0."""

    latent: torch.Tensor
    start: int
    first_draft: int


def header_hash(request_id: str, dtype: int, shape, first_token: int, total_bytes: int,
                draft: tuple[int, int, int] = (0, 0, 0)):
    header = f"{request_id}|{dtype}|{','.join(str(int(d)) for d in shape)}|{first_token}|" \
             f"{total_bytes}|"
    if draft[1]:  # (draft_from, draft_tokens, first_draft)
        header += "draft:" + ",".join(str(int(d)) for d in draft) + "|"
    return hashlib.sha256(header.encode())


def kv_chunks(request_id: str, latent: torch.Tensor, first_token: int,
              chunk_bytes: int = CHUNK_BYTES, first_logprobs: TokenLogprobs | None = None,
              draft: DraftKV | None = None) -> Iterator[serving_pb2.KVChunk]:
    dtype = "bf16" if latent.dtype == torch.bfloat16 else "fp32"
    wire = encode(latent, dtype)
    data = wire.data
    meta = (0, 0, 0)
    if draft is not None:
        data += encode(draft.latent.to(latent.dtype), dtype).data
        meta = (draft.start, draft.latent.shape[1], draft.first_draft)
    hasher = header_hash(request_id, dtype_to_proto(dtype), wire.shape, first_token, len(data),
                         meta)
    lp = logprobs_to_proto(first_logprobs) if first_logprobs is not None else None
    if lp is not None:
        hasher.update(lp.SerializeToString(deterministic=True))
    hasher.update(data)
    digest = hasher.digest()
    pieces = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    for i, piece in enumerate(pieces):
        chunk = serving_pb2.KVChunk(request_id=request_id, index=i, data=piece,
                                    last=i == len(pieces) - 1)
        if i == 0:
            chunk.dtype = dtype_to_proto(dtype)
            chunk.shape.extend(wire.shape)
            chunk.first_token = first_token
            chunk.total_bytes = len(data)
            chunk.draft_from, chunk.draft_tokens, chunk.first_draft = meta
            if lp is not None:
                chunk.first_token_logprobs.CopyFrom(lp)
        if chunk.last:
            chunk.sha256 = digest
        yield chunk


class KVAssembler:
    def __init__(self) -> None:
        self.request_id = ""
        self.first: serving_pb2.KVChunk | None = None
        self.parts: list[bytes] = []
        self.hasher = None
        self.received = 0
        self.done = False

    def add(self, chunk: serving_pb2.KVChunk) -> None:
        if self.done:
            raise TransferError("INVALID_ARGUMENT", "chunk after the last one")
        expected = len(self.parts)
        if chunk.index != expected:
            raise TransferError("INVALID_ARGUMENT", f"chunk {chunk.index} arrived, expected {expected}")
        if expected == 0:
            self.first, self.request_id = chunk, chunk.request_id
            self.hasher = header_hash(chunk.request_id, chunk.dtype, chunk.shape,
                                       chunk.first_token, chunk.total_bytes,
                                       (chunk.draft_from, chunk.draft_tokens, chunk.first_draft))
            if chunk.HasField("first_token_logprobs"):
                self.hasher.update(chunk.first_token_logprobs.SerializeToString(
                    deterministic=True))
        elif chunk.request_id != self.request_id:
            raise TransferError("INVALID_ARGUMENT", "chunks of two requests in one transfer")
        self.parts.append(chunk.data)
        self.hasher.update(chunk.data)
        self.received += len(chunk.data)
        if self.received > self.first.total_bytes:
            raise TransferError("DATA_LOSS", f"more than the announced {self.first.total_bytes} bytes")
        if chunk.last:
            self.done = True
            if self.received != self.first.total_bytes:
                raise TransferError("DATA_LOSS", f"got {self.received} of {self.first.total_bytes} bytes")
            if self.hasher.digest() != chunk.sha256:
                raise TransferError("DATA_LOSS", f"KV checksum mismatch for {self.request_id}")

    def tensor(self, out_dtype: torch.dtype) -> torch.Tensor:
        """The prompt's latent KV [layers, tokens, latent_dim]."""
        return self._decode(tuple(self.first.shape) if self.first else (), 0, out_dtype)

    def draft(self, out_dtype: torch.dtype) -> DraftKV | None:
        """The MTP draft layer's KV, when the prefill sent it."""
        if self.first is None or not self.first.draft_tokens:
            return None
        f = self.first
        if len(f.shape) != 3:
            raise TransferError("INVALID_ARGUMENT", f"KV shape {list(f.shape)} is not 3-D")
        if f.draft_from + f.draft_tokens != f.shape[1]:
            raise TransferError("INVALID_ARGUMENT",
                                f"draft KV of positions {f.draft_from}.. +{f.draft_tokens} "
                                f"does not end at the prompt's {f.shape[1]} tokens")
        offset = 1
        for d in f.shape:
            offset *= int(d)
        latent = self._decode((1, f.draft_tokens, f.shape[2]), offset, out_dtype)
        return DraftKV(latent, f.draft_from, f.first_draft)

    def _decode(self, shape: tuple[int, ...], offset: int, out_dtype) -> torch.Tensor:
        """The tensor of `shape` at element `offset` of the data (the prompt's KV first, the
        draft's after it; each must fill its part exactly)."""
        if not self.done or self.first is None:
            raise TransferError("DATA_LOSS", "transfer ended before its last chunk")
        try:
            dtype = dtype_from_proto(self.first.dtype)
            size = 2 if dtype == "bf16" else 4
            data = b"".join(self.parts)
            n = 1
            for d in shape:
                n *= int(d)
            has_draft = self.first.draft_tokens > 0
            stop = offset * size + n * size if (offset or has_draft) else len(data)
            if offset and stop != len(data):
                raise WireError(f"the draft KV needs {n * size} bytes after the prompt's, "
                                f"got {len(data) - offset * size}")
            return decode(WireTensor(dtype, shape, data[offset * size:stop]), out_dtype)
        except (WireError, ValueError) as exc:
            raise TransferError("INVALID_ARGUMENT", str(exc)) from exc

    @property
    def first_token(self) -> int:
        return self.first.first_token if self.first is not None else -1

    @property
    def first_token_logprobs(self) -> TokenLogprobs | None:
        if self.first is None or not self.first.HasField("first_token_logprobs"):
            return None
        return logprobs_from_proto(self.first.first_token, self.first.first_token_logprobs)
