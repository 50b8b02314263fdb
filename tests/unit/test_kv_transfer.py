"""Latent-KV transfer: chunking, reassembly, and failing closed on every kind of damage."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.kv_transfer import (
    CHUNK_BYTES,
    KVAssembler,
    TransferError,
    header_hash,
    kv_chunks,
)
from services.protos_gen.epserve.v1 import serving_pb2, tensor_pb2

LAYERS, TOKENS, LATENT = 3, 5, 40  # fp32: 3 * 5 * 40 * 4 = 2400 bytes


def latent(dtype: torch.dtype = torch.float32, shape=(LAYERS, TOKENS, LATENT),
           seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assemble(chunks) -> KVAssembler:
    a = KVAssembler()
    for c in chunks:
        a.add(c)
    return a


def copy(chunk: serving_pb2.KVChunk) -> serving_pb2.KVChunk:
    out = serving_pb2.KVChunk()
    out.CopyFrom(chunk)
    return out


def code_of(exc_info) -> str:
    assert isinstance(exc_info.value, TransferError)
    return exc_info.value.code


# -- the sender --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_bytes, count", [(1, 2400), (7, 343), (1000, 3), (2400, 1),
                                                (4096, 1), (CHUNK_BYTES, 1)])
def test_chunk_layout(chunk_bytes, count):
    x = latent()
    chunks = list(kv_chunks("req-1", x, first_token=42, chunk_bytes=chunk_bytes))
    assert len(chunks) == count == math.ceil(2400 / chunk_bytes)
    assert [c.index for c in chunks] == list(range(count))
    assert [c.last for c in chunks] == [False] * (count - 1) + [True]
    assert all(c.request_id == "req-1" for c in chunks)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    first, last = chunks[0], chunks[-1]
    assert first.dtype == tensor_pb2.DTYPE_FP32
    assert list(first.shape) == [LAYERS, TOKENS, LATENT]
    assert first.first_token == 42 and first.total_bytes == 2400
    data = b"".join(c.data for c in chunks)
    assert data == x.numpy().tobytes()
    header = f"req-1|{tensor_pb2.DTYPE_FP32}|{LAYERS},{TOKENS},{LATENT}|42|2400|".encode()
    assert last.sha256 == hashlib.sha256(header + data).digest()  # the header is covered too
    for c in chunks[1:]:  # header fields travel on the first chunk only
        assert c.total_bytes == 0 and not c.shape
    for c in chunks[:-1]:
        assert c.sha256 == b""


def test_bf16_is_sent_as_bf16():
    chunks = list(kv_chunks("r", latent(torch.bfloat16), 0))
    assert chunks[0].dtype == tensor_pb2.DTYPE_BF16
    assert chunks[0].total_bytes == LAYERS * TOKENS * LATENT * 2


# -- roundtrips --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 100, 2399, 2400, 2401, CHUNK_BYTES])
def test_fp32_roundtrip_is_bit_exact(chunk_bytes):
    x = latent()
    a = assemble(kv_chunks("req-1", x, 7, chunk_bytes=chunk_bytes))
    assert a.done and a.request_id == "req-1" and a.first_token == 7
    y = a.tensor(torch.float32)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("chunk_bytes", [1, 6, 64, CHUNK_BYTES])
def test_bf16_roundtrip_is_bit_exact(chunk_bytes):
    x = latent(torch.bfloat16)
    a = assemble(kv_chunks("r", x, 3, chunk_bytes=chunk_bytes))
    assert torch.equal(a.tensor(torch.bfloat16), x)
    assert torch.equal(a.tensor(torch.float32), x.float())


def test_tensor_smaller_than_one_chunk():
    x = latent(shape=(1, 1, 2))
    chunks = list(kv_chunks("small", x, 1, chunk_bytes=1024))
    assert len(chunks) == 1 and chunks[0].last and chunks[0].index == 0
    assert torch.equal(assemble(chunks).tensor(torch.float32), x)


def test_empty_tensor_travels_as_one_empty_chunk():
    x = torch.zeros(LAYERS, 0, LATENT)
    chunks = list(kv_chunks("empty", x, 5))
    assert len(chunks) == 1 and chunks[0].data == b"" and chunks[0].last
    y = assemble(chunks).tensor(torch.float32)
    assert y.shape == (LAYERS, 0, LATENT)


def test_first_token_before_any_chunk():
    assert KVAssembler().first_token == -1


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), tokens=st.integers(1, 9), dim=st.integers(1, 8),
       chunk_bytes=st.integers(1, 300), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_roundtrip_any_shape_and_chunk_size(layers, tokens, dim, chunk_bytes, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = latent(dtype, (layers, tokens, dim), seed)
    a = assemble(kv_chunks("h", x, 9, chunk_bytes=chunk_bytes))
    assert torch.equal(a.tensor(dtype), x)


# -- damage ------------------------------------------------------------------------------------

def chunks_of(chunk_bytes: int = 1000) -> list[serving_pb2.KVChunk]:
    return [copy(c) for c in kv_chunks("req-1", latent(), 11, chunk_bytes=chunk_bytes)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_corrupted_byte_is_data_loss(which):
    chunks = chunks_of()
    data = bytearray(chunks[which].data)
    data[len(data) // 2] ^= 0x01
    chunks[which].data = bytes(data)
    a = KVAssembler()
    for c in chunks[:-1]:
        a.add(c)
    with pytest.raises(TransferError, match="KV checksum mismatch for req-1") as exc_info:
        a.add(chunks[-1])
    assert code_of(exc_info) == "DATA_LOSS"


def test_corrupted_checksum_is_data_loss():
    chunks = chunks_of()
    chunks[-1].sha256 = b"\x00" * 32
    with pytest.raises(TransferError) as exc_info:
        assemble(chunks)
    assert code_of(exc_info) == "DATA_LOSS"


def test_missing_chunk_is_invalid_argument():
    chunks = chunks_of()
    a = KVAssembler()
    a.add(chunks[0])
    with pytest.raises(TransferError, match="chunk 2 arrived, expected 1") as exc_info:
        a.add(chunks[2])
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_out_of_order_is_invalid_argument():
    chunks = chunks_of()
    with pytest.raises(TransferError, match="chunk 1 arrived, expected 0") as exc_info:
        assemble([chunks[1], chunks[0], chunks[2]])
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_repeated_chunk_is_invalid_argument():
    chunks = chunks_of()
    with pytest.raises(TransferError, match="chunk 0 arrived, expected 1") as exc_info:
        assemble([chunks[0], chunks[0]])
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_truncated_transfer_is_data_loss():
    chunks = chunks_of()  # 1000 + 1000 + 400 bytes
    truncated = chunks[:2]
    truncated[-1].last = True
    truncated[-1].sha256 = hashlib.sha256(b"".join(c.data for c in truncated)).digest()
    with pytest.raises(TransferError, match="got 2000 of 2400 bytes") as exc_info:
        assemble(truncated)
    assert code_of(exc_info) == "DATA_LOSS"


def test_more_than_announced_is_data_loss():
    chunks = chunks_of()
    chunks[0].total_bytes = 1500
    a = KVAssembler()
    a.add(chunks[0])
    with pytest.raises(TransferError, match="more than the announced 1500 bytes") as exc_info:
        a.add(chunks[1])
    assert code_of(exc_info) == "DATA_LOSS"


def test_chunk_after_the_last_is_invalid_argument():
    chunks = chunks_of()
    a = assemble(chunks)
    extra = copy(chunks[-1])
    extra.index = len(chunks)
    with pytest.raises(TransferError, match="chunk after the last one") as exc_info:
        a.add(extra)
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_chunks_of_two_requests_are_invalid_argument():
    chunks = chunks_of()
    chunks[1].request_id = "other"
    a = KVAssembler()
    a.add(chunks[0])
    with pytest.raises(TransferError, match="chunks of two requests") as exc_info:
        a.add(chunks[1])
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_tensor_before_the_last_chunk_is_refused():
    chunks = chunks_of()
    a = KVAssembler()
    with pytest.raises(TransferError, match="transfer ended before its last chunk") as exc_info:
        a.tensor(torch.float32)
    assert code_of(exc_info) == "DATA_LOSS"
    a.add(chunks[0])
    a.add(chunks[1])
    with pytest.raises(TransferError, match="before its last chunk"):
        a.tensor(torch.float32)


def resigned(chunks):
    """The chunks with a checksum recomputed over their (altered) header: a buggy sender."""
    first = chunks[0]
    hasher = header_hash(first.request_id, first.dtype, first.shape, first.first_token,
                          first.total_bytes)
    for c in chunks:
        hasher.update(c.data)
    chunks[-1].sha256 = hasher.digest()
    return chunks


@pytest.mark.parametrize("field", ["shape", "dtype", "first_token"])
def test_a_header_altered_in_flight_fails_the_checksum(field):
    chunks = chunks_of()
    if field == "shape":
        del chunks[0].shape[:]
        chunks[0].shape.extend([LAYERS, TOKENS + 1, LATENT])
    elif field == "dtype":
        chunks[0].dtype = tensor_pb2.DTYPE_BF16
    else:
        chunks[0].first_token = 12
    with pytest.raises(TransferError, match="checksum mismatch") as exc_info:
        assemble(chunks)
    assert code_of(exc_info) == "DATA_LOSS"


def test_shape_that_does_not_match_the_bytes_is_invalid_argument():
    chunks = chunks_of()
    del chunks[0].shape[:]
    chunks[0].shape.extend([LAYERS, TOKENS + 1, LATENT])
    a = assemble(resigned(chunks))  # a sender that signed a wrong shape
    with pytest.raises(TransferError, match="needs 2880 bytes, got 2400") as exc_info:
        a.tensor(torch.float32)
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_unsupported_dtype_is_invalid_argument():
    chunks = chunks_of()
    chunks[0].dtype = 999
    a = assemble(resigned(chunks))
    with pytest.raises(TransferError, match="unsupported tensor dtype") as exc_info:
        a.tensor(torch.float32)
    assert code_of(exc_info) == "INVALID_ARGUMENT"


def test_the_first_tokens_logprobs_travel_with_the_kv_under_the_checksum():
    from services.engine.sampling import TokenLogprobs
    lp = TokenLogprobs(11, -0.25, ((11, -0.25), (3, -1.5)))
    chunks = [copy(c) for c in kv_chunks("req-1", latent(), 11, chunk_bytes=1000,
                                         first_logprobs=lp)]
    assert assemble(chunks).first_token_logprobs == lp
    assert assemble(chunks_of()).first_token_logprobs is None  # not asked for
    chunks[0].first_token_logprobs.logprob = -0.1  # altered in flight
    with pytest.raises(TransferError, match="checksum mismatch"):
        assemble(chunks)
