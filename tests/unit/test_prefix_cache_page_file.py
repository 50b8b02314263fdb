"""The page file format: round trips, and failing closed on every kind of damage."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
import torch

from services.prefix_cache.keys import NO_PARENT
from services.prefix_cache.page_file import (
    HEADER_SIZE,
    CorruptPage,
    bytes_to_latent,
    decode_page,
    encode_page,
    latent_to_bytes,
    read_header,
)

NS = hashlib.sha256(b"ns").digest()
KEY = hashlib.sha256(b"key").digest()
PARENT = hashlib.sha256(b"parent").digest()
PAYLOAD = bytes(random.Random(0).randrange(256) for _ in range(900))


def page(key=KEY, parent=PARENT, payload=PAYLOAD, tokens=64) -> bytes:
    return encode_page(key, parent, NS, tokens, payload)


def reason(data: bytes, key=KEY, namespace=NS) -> str:
    with pytest.raises(CorruptPage) as info:
        decode_page(data, key, namespace)
    return info.value.reason


def test_round_trip():
    data = page()
    assert len(data) == HEADER_SIZE + len(PAYLOAD) == 152 + 900
    header, payload = decode_page(data, KEY, NS)
    assert payload == PAYLOAD
    assert (header.key, header.parent, header.namespace) == (KEY, PARENT, NS)
    assert (header.token_count, header.payload_length, header.version) == (64, 900, 1)
    assert header.file_size == len(data)
    assert read_header(data) == header
    assert read_header(data[:HEADER_SIZE]) == header  # the header alone is enough


def test_layout_is_explicit_little_endian():
    data = page(parent=NO_PARENT)
    assert data[:8] == b"EPKVPAGE"
    assert struct.unpack_from("<I", data, 8) == (1,)
    assert data[12:44] == KEY and data[44:76] == NO_PARENT
    assert struct.unpack_from("<I", data, 76) == (64,)
    assert data[80:112] == NS
    assert struct.unpack_from("<Q", data, 112) == (900,)
    assert data[120:152] == hashlib.sha256(data[:120] + PAYLOAD).digest()


def test_empty_payload():
    assert decode_page(page(payload=b""), KEY)[1] == b""


def test_every_single_byte_flip_is_caught():
    data = page()
    rng = random.Random(1)
    for pos in range(len(data)):  # every position, header and payload
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptPage):
            decode_page(bytes(damaged), KEY, NS)


@pytest.mark.parametrize("pos, expected", [(0, "magic"), (8, "version"), (12, "checksum"),
                                           (80, "checksum"), (200, "checksum")])
def test_flip_reasons(pos, expected):
    damaged = bytearray(page())
    damaged[pos] ^= 0xFF
    assert reason(bytes(damaged)) == expected


@pytest.mark.parametrize("cut", [0, 1, 100, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 899])
def test_truncation(cut):
    assert reason(page()[:cut]) == "short"


def test_trailing_bytes():
    assert reason(page() + b"\0") == "length"


def test_swapped_files_fail_on_the_key():
    other = hashlib.sha256(b"other").digest()
    a, b = page(KEY), page(other, payload=b"another payload")
    assert reason(b, key=KEY) == "key"
    assert reason(a, key=other) == "key"


def test_wrong_namespace():
    assert reason(page(), namespace=hashlib.sha256(b"ns2").digest()) == "namespace"
    decode_page(page(), KEY)  # no namespace expected: not checked


def test_read_header_checks():
    with pytest.raises(CorruptPage, match="short"):
        read_header(page()[:HEADER_SIZE - 1])
    bad = bytearray(page())
    bad[9] = 7
    with pytest.raises(CorruptPage, match="version"):
        read_header(bytes(bad))


def test_encode_rejects():
    with pytest.raises(ValueError):
        encode_page(b"short", PARENT, NS, 64, b"")
    with pytest.raises(ValueError):
        encode_page(KEY, PARENT, NS, 2**32, b"")
    assert issubclass(CorruptPage, ValueError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latent_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 64, 40, generator=g) * 100).to(dtype)
    x[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]).to(dtype)
    raw = latent_to_bytes(x)
    assert len(raw) == x.numel() * x.element_size()
    y = bytes_to_latent(raw, (3, 64, 40), dtype)
    assert y.dtype == dtype and y.shape == x.shape
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(x.view(int_view), y.view(int_view))  # bits, NaN and -0.0 included


def test_latent_of_a_view():
    x = torch.arange(2 * 128 * 8, dtype=torch.float32).reshape(2, 128, 8)
    part = x[:, 64:128]  # not contiguous
    assert torch.equal(bytes_to_latent(latent_to_bytes(part), (2, 64, 8), torch.float32), part)


def test_latent_is_little_endian():
    assert latent_to_bytes(torch.tensor([1.0], dtype=torch.float32)) == struct.pack("<f", 1.0)
    assert latent_to_bytes(torch.tensor([1.0], dtype=torch.bfloat16)) == b"\x80\x3f"


def test_latent_size_mismatch():
    with pytest.raises(ValueError):
        bytes_to_latent(b"\0" * 10, (2, 3), torch.float32)
