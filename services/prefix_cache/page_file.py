"""The page file format: a fixed little-endian header, then the payload (pure encode/decode).

    offset size field
         0    8 magic b"EPKVPAGE"
         8    4 format version (uint32, 1)
        12   32 own key
        44   32 parent key (zeros for page 0)
        76    4 token count (uint32)
        80   32 namespace
       112    8 payload length (uint64)
       120   32 sha256 over bytes 0..119 and the payload
       152      payload

The checksum covers the header fields too, so a flipped key, count or length is caught like a
flipped payload byte. decode_page fails closed: anything that does not match raises
CorruptPage, and the caller treats the page as a miss. The latent helpers import torch inside
the functions: the disk store (and the crash-test writer) handle bytes only and start faster
without it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.prefix_cache.keys import KEY_BYTES, dtype_name

if TYPE_CHECKING:
    import torch

MAGIC = b"EPKVPAGE"
VERSION = 1
_FIELDS = struct.Struct("<8sI32s32sI32sQ")
CHECKSUM_BYTES = 32
HEADER_SIZE = _FIELDS.size + CHECKSUM_BYTES  # 152
REASONS = ("short", "magic", "version", "key", "namespace", "length", "checksum")
# Bit-exact views: NaN payloads and signed zeros survive, and the byte order is explicit.
_INT_VIEWS = {"float32": ("int32", "<i4"), "bfloat16": ("int16", "<i2"),
              "float16": ("int16", "<i2")}


class CorruptPage(ValueError):
    """A page file that must not be loaded; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class PageHeader:
    key: bytes
    parent: bytes
    token_count: int
    namespace: bytes
    payload_length: int
    checksum: bytes
    version: int = VERSION

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.payload_length


def _check_key(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes")


def encode_page(key: bytes, parent: bytes, namespace: bytes, token_count: int,
                payload: bytes) -> bytes:
    for name, value in (("key", key), ("parent", parent), ("namespace", namespace)):
        _check_key(name, value)
    if not 0 <= token_count < 2**32:
        raise ValueError(f"token_count {token_count} does not fit in uint32")
    fields = _FIELDS.pack(MAGIC, VERSION, bytes(key), bytes(parent), token_count,
                          bytes(namespace), len(payload))
    checksum = hashlib.sha256(fields)
    checksum.update(payload)
    return b"".join((fields, checksum.digest(), payload))


def read_header(data: bytes) -> PageHeader:
    """The header alone (for index rebuilds): checks its size, magic and version, not the
    checksum, which needs the payload."""
    if len(data) < HEADER_SIZE:
        raise CorruptPage("short", f"{len(data)} < {HEADER_SIZE} header bytes")
    magic, version, key, parent, tokens, namespace, length = _FIELDS.unpack_from(data)
    if magic != MAGIC:
        raise CorruptPage("magic")
    if version != VERSION:
        raise CorruptPage("version", f"{version}")
    checksum = bytes(data[_FIELDS.size:HEADER_SIZE])
    return PageHeader(key, parent, tokens, namespace, length, checksum, version)


def decode_page(data: bytes, expected_key: bytes,
                expected_namespace: bytes | None = None) -> tuple[PageHeader, bytes]:
    """The verified header and payload, or CorruptPage. The checksum is checked before the
    key: a damaged file says 'checksum', an intact file that is not the page asked for (two
    files swapped) says 'key'."""
    header = read_header(data)
    actual = len(data) - HEADER_SIZE
    if actual < header.payload_length:
        raise CorruptPage("short", f"{actual} < {header.payload_length} payload bytes")
    if actual > header.payload_length:
        raise CorruptPage("length", f"{actual} > {header.payload_length} payload bytes")
    view = memoryview(data)
    digest = hashlib.sha256(view[:_FIELDS.size])
    digest.update(view[HEADER_SIZE:])
    if digest.digest() != header.checksum:
        raise CorruptPage("checksum")
    if header.key != expected_key:
        raise CorruptPage("key")
    if expected_namespace is not None and header.namespace != expected_namespace:
        raise CorruptPage("namespace")
    return header, bytes(view[HEADER_SIZE:])


def latent_to_bytes(t: torch.Tensor) -> bytes:
    """A tensor's exact bits, little-endian (numpy has no bfloat16: go through an int view)."""
    import torch

    int_dtype, le = _INT_VIEWS[dtype_name(t.dtype)]
    ints = t.detach().cpu().contiguous().reshape(-1).view(getattr(torch, int_dtype))
    return ints.numpy().astype(le, copy=False).tobytes()


def bytes_to_latent(b: bytes, shape, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of latent_to_bytes; ValueError when the size does not match the shape."""
    import numpy as np
    import torch

    _, le = _INT_VIEWS[dtype_name(dtype)]
    shape = tuple(int(d) for d in shape)
    count = 1
    for d in shape:
        count *= d
    item = np.dtype(le).itemsize
    if len(b) != count * item:
        raise ValueError(f"{len(b)} bytes do not hold {shape} of {dtype_name(dtype)}")
    # astype copies into native order and a writable array (frombuffer's is read-only).
    ints = np.frombuffer(b, dtype=le).astype(np.dtype(le).newbyteorder("="))
    return torch.from_numpy(ints).view(dtype).reshape(shape)
