"""Page keys, namespaces, layouts and the checkpoint fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.prefix_cache.fingerprint import model_fingerprint as fingerprint_impl
from services.prefix_cache.keys import (
    PAGE_TOKENS,
    kv_layout,
    model_fingerprint,
    namespace_key,
    page_keys,
)

REPO = Path(__file__).resolve().parents[2]
NS = namespace_key("model-a", kv_layout(2, 80, torch.bfloat16))


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(i * 7919 + offset) % 50_000 for i in range(n)]


# -- layout and namespace ----------------------------------------------------------------------

def test_layout_string():
    assert kv_layout(2, 80, torch.bfloat16) == "latent-v1:L=2:D=80:bfloat16:page=64"
    assert kv_layout(61, 576, torch.float32) == "latent-v1:L=61:D=576:float32:page=64"


@pytest.mark.parametrize("args", [(0, 80, torch.float32), (2, -1, torch.float32),
                                  (2, 80, torch.int64), (2.0, 80, torch.float32)])
def test_layout_rejects(args):
    with pytest.raises(ValueError):
        kv_layout(*args)


def test_namespace_is_length_prefixed():
    assert namespace_key("ab", "c") != namespace_key("a", "bc")
    assert namespace_key("a", "b", "c") != namespace_key("a", "bc", "")
    assert len(namespace_key("a", "b")) == 32


def test_namespace_separates_model_layout_and_tenant():
    layout = kv_layout(2, 80, torch.bfloat16)
    spaces = {namespace_key("m1", layout), namespace_key("m2", layout),
              namespace_key("m1", kv_layout(2, 80, torch.float32)),
              namespace_key("m1", layout, tenant="t1"), namespace_key("m1", layout, tenant="t2")}
    assert len(spaces) == 5
    ids = prompt(128)
    assert len({tuple(page_keys(ns, ids)) for ns in spaces}) == 5


# -- page keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("n, pages", [(0, 0), (1, 0), (63, 0), (64, 1), (127, 1), (128, 2),
                                      (200, 3)])
def test_one_key_per_full_page(n, pages):
    keys = page_keys(NS, prompt(n))
    assert len(keys) == pages
    assert all(len(k) == 32 for k in keys)
    assert len(set(keys)) == pages


def test_partial_page_changes_no_key():
    base = prompt(150)
    tail_changed = base[:128] + [1] * 22
    assert page_keys(NS, base) == page_keys(NS, tail_changed) == page_keys(NS, base[:128])


def test_chain_property():
    ids = prompt(5 * PAGE_TOKENS)
    keys = page_keys(NS, ids)
    for page in range(5):
        changed = list(ids)
        changed[page * PAGE_TOKENS + 17] += 1
        other = page_keys(NS, changed)
        assert other[:page] == keys[:page]
        assert all(a != b for a, b in zip(other[page:], keys[page:], strict=True))


def test_same_page_in_another_position_gets_another_key():
    page = prompt(PAGE_TOKENS)
    keys = page_keys(NS, page + page)
    assert keys[0] != keys[1]


def test_matches_the_definition():
    import hashlib
    import struct

    ids = prompt(130)
    k0 = hashlib.sha256(NS + struct.pack("<64I", *ids[:64])).digest()
    k1 = hashlib.sha256(k0 + struct.pack("<64I", *ids[64:128])).digest()
    assert page_keys(NS, ids) == [k0, k1]


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5])
def test_rejects_ids_outside_uint32(bad):
    with pytest.raises(ValueError):
        page_keys(NS, [1] * 64 + [bad])
    with pytest.raises(ValueError):
        page_keys(NS, [bad] + [1] * 63)


def test_accepts_tensors_and_the_largest_id():
    ids = torch.tensor([2**32 - 1] * 64 + [5] * 64)
    assert page_keys(NS, ids) == page_keys(NS, [2**32 - 1] * 64 + [5] * 64)


def test_rejects_bad_namespace():
    with pytest.raises(ValueError):
        page_keys(b"short", prompt(64))


def test_deterministic_across_processes():
    code = ("from services.prefix_cache.keys import namespace_key, page_keys\n"
            "ns = namespace_key('model-a', 'latent-v1:L=2:D=80:bfloat16:page=64')\n"
            "ids = [(i * 7919) % 50000 for i in range(200)]\n"
            "print(' '.join(k.hex() for k in page_keys(ns, ids)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert out.stdout.split() == [k.hex() for k in page_keys(NS, prompt(200))]


# -- the fingerprint ---------------------------------------------------------------------------

def checkpoint(path: Path, seed: int, files: int = 2, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"hidden_size": 16}))
    g = torch.Generator().manual_seed(seed)
    for f in range(files):
        save_file({"w": torch.randn(64, 300, generator=g)},
                  str(path / f"model-{f:05d}.safetensors"))
    return path


@pytest.mark.parametrize("limit", [2 << 30, 0], ids=["whole", "sampled"])
def test_fingerprint_tells_seeds_apart(tmp_path, limit):
    a = checkpoint(tmp_path / "a", seed=0)
    a_again = checkpoint(tmp_path / "a2", seed=0)
    b = checkpoint(tmp_path / "b", seed=1)
    fa = fingerprint_impl(a, full_hash_limit=limit)
    assert fa == fingerprint_impl(a_again, full_hash_limit=limit)
    assert fa != fingerprint_impl(b, full_hash_limit=limit)
    assert len(fa) == 64


def test_fingerprint_modes_differ_and_config_counts(tmp_path):
    a = checkpoint(tmp_path / "a", seed=0)
    c = checkpoint(tmp_path / "c", seed=0, config={"hidden_size": 17})
    assert model_fingerprint(a) != fingerprint_impl(a, full_hash_limit=0)
    assert model_fingerprint(a) != model_fingerprint(c)


def test_sampled_fingerprint_sees_a_byte_in_a_window(tmp_path):
    a = checkpoint(tmp_path / "a", seed=0, files=1)
    before = fingerprint_impl(a, full_hash_limit=0)
    weights = a / "model-00000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # the last window ends at the last byte
    weights.write_bytes(bytes(data))
    assert fingerprint_impl(a, full_hash_limit=0) != before


def test_fingerprint_of_a_generated_checkpoint(tiny_model_dir, tmp_path):
    from services.model.checkpoint_gen import make_model

    other = make_model("tiny", tmp_path / "seed1", seed=1)
    assert model_fingerprint(tiny_model_dir) != model_fingerprint(other)


def test_fingerprint_needs_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path)
