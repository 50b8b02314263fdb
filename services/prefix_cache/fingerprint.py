"""The identity of a checkpoint's weights, for the prefix cache's namespace.

Pages computed by one set of weights must never be read by another, even when the shapes
match (two seeds of one config), so the fingerprint hashes the weights themselves. The only
module besides the disk store that reads files: once, at start.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

FULL_HASH_LIMIT = 2 << 30  # 2 GiB: above it, sample
SAMPLES = 256
SAMPLE_BYTES = 64 << 10
_READ_CHUNK = 4 << 20
_MAX_HEADER = 100 << 20  # safetensors refuses larger headers too
_DOMAIN = b"epserve-model-fingerprint-v1"


def _frame(h, label: str, value: bytes) -> None:
    raw = label.encode()
    h.update(struct.pack("<Q", len(raw)) + raw + struct.pack("<Q", len(value)))
    h.update(value)


def _hash_whole(h, path: Path) -> None:
    h.update(struct.pack("<Q", path.stat().st_size))
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
            h.update(chunk)


def _hash_sampled(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(struct.pack("<Q", size))
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: safetensors header length {header_len} is implausible")
        h.update(prefix + f.read(header_len))
        # Evenly spaced windows from the first byte to the last; each carries its offset.
        span = max(size - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            offset = span * i // (SAMPLES - 1)
            f.seek(offset)
            h.update(struct.pack("<Q", offset) + f.read(SAMPLE_BYTES))


def model_fingerprint(model_dir, full_hash_limit: int = FULL_HASH_LIMIT) -> str:
    """Hex sha256 over config.json's bytes and every *.safetensors file, sorted by name.

    A checkpoint of at most `full_hash_limit` bytes (2 GiB) is hashed whole. A larger one gets
    a *sampled* fingerprint, so that a 700 GB checkpoint is not read at every start: per file,
    its safetensors header (names, dtypes, shapes, offsets), 256 evenly spaced 64 KiB windows
    and its size. Retrained or re-seeded weights change every window and are told apart; an
    edit confined to the bytes between windows is not. An operator who needs certainty
    overrides the fingerprint with an explicit namespace string.
    """
    root = Path(model_dir)
    config = root / "config.json"
    weights = sorted(root.glob("*.safetensors"), key=lambda p: p.name)
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found")
    if not weights:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    total = sum(p.stat().st_size for p in weights)
    sampled = total > full_hash_limit
    h = hashlib.sha256(_DOMAIN)
    _frame(h, "mode", b"sampled" if sampled else b"full")
    _frame(h, "config.json", config.read_bytes())
    for path in weights:
        _frame(h, "file", os.fsencode(path.name))
        (_hash_sampled if sampled else _hash_whole)(h, path)
    return h.hexdigest()
