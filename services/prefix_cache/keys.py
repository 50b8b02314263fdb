"""Page identity: which namespace a page belongs to and which prefix of tokens it holds.

A page is PAGE_TOKENS consecutive tokens of a prompt. Its key chains the keys before it,
key_0 = H(namespace ‖ ids of page 0), key_i = H(key_{i-1} ‖ ids of page i), so one key
names the whole prefix up to the end of its page: two prompts share page i's key exactly when
they share every token up to it (and the namespace: model, KV layout, tenant). Keys are
sha256, never Python's hash(), so every process on every machine computes the same ones.
Pure: no torch import (the dtype is read by name), no I/O. model_fingerprint, which reads
the checkpoint, lives in fingerprint.py and is re-exported here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from services.prefix_cache.fingerprint import model_fingerprint

__all__ = ["KEY_BYTES", "NO_PARENT", "PAGE_TOKENS", "kv_layout", "model_fingerprint",
           "namespace_key", "page_keys", "tenant_root"]

PAGE_TOKENS = 64  # DeepSeek's KV storage unit
KEY_BYTES = 32
NO_PARENT = bytes(KEY_BYTES)  # the parent of page 0
LAYOUT_VERSION = "latent-v1"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_NAMESPACE_DOMAIN = b"epserve-prefix-namespace-v1"


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16, read from its name so that this module needs no torch."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported latent dtype {dtype!r}; expected one of {DTYPE_NAMES}")
    return name


def kv_layout(num_layers: int, latent_dim: int, dtype, page_tokens: int = PAGE_TOKENS) -> str:
    """The canonical name of a page's tensor layout, e.g. 'latent-v1:L=2:D=80:bfloat16:page=64'.

    It enters the namespace, so a change of layers, width, dtype or page size never reads
    pages written under another one.
    """
    for name, value in (("num_layers", num_layers), ("latent_dim", latent_dim),
                        ("page_tokens", page_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return f"{LAYOUT_VERSION}:L={num_layers}:D={latent_dim}:{dtype_name(dtype)}:page={page_tokens}"


def namespace_key(model_fingerprint: str, layout: str, tenant: str = "") -> bytes:
    """32-byte sha256 over the length-prefixed parts, so ('ab', 'c') and ('a', 'bc') differ."""
    h = hashlib.sha256(_NAMESPACE_DOMAIN)
    for part in (model_fingerprint, layout, tenant):
        raw = part.encode("utf-8")
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)
    return h.digest()


def tenant_root(namespace: bytes, tenant: str) -> bytes:
    """The root of a tenant's key chains: its pages share the store (and its namespace, which
    page headers carry) but never a key with another tenant's, so no tenant ever hits another
    one's pages. The empty tenant (no API keys) is the namespace itself."""
    if not tenant:
        return namespace
    raw = tenant.encode("utf-8")
    return hashlib.sha256(b"epserve-prefix-tenant-v1" + namespace
                          + struct.pack("<Q", len(raw)) + raw).digest()


def _pack_ids(ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(ids)}I", *ids)
    except struct.error as exc:  # negative, >= 2^32, or not an integer
        raise ValueError(f"token ids must be integers in [0, 2^32): {exc}") from exc


def page_keys(namespace: bytes, token_ids: Sequence[int],
              page_tokens: int = PAGE_TOKENS) -> list[bytes]:
    """One key per full page of the prompt, in order; a partial last page has none."""
    if len(namespace) != KEY_BYTES:
        raise ValueError(f"namespace must be {KEY_BYTES} bytes, got {len(namespace)}")
    if page_tokens <= 0:
        raise ValueError("page_tokens must be > 0")
    ids = list(token_ids)
    full = len(ids) // page_tokens
    _pack_ids(ids[full * page_tokens:])  # the tail is not hashed, but a bad id is still a bug
    keys: list[bytes] = []
    previous = namespace
    for i in range(full):
        previous = hashlib.sha256(previous + _pack_ids(ids[i * page_tokens:(i + 1) * page_tokens])).digest()
        keys.append(previous)
    return keys
