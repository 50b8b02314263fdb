"""The router's view of what each prefill instance's prefix cache holds: exact page keys,
matched from token 0, stale advertisements dropped, garbage ignored."""

from __future__ import annotations

from services.prefix_cache.keys import namespace_key, page_keys
from services.protos_gen.epserve.v1 import control_pb2
from services.router.prefix_view import PrefixCacheView

FP, LAYOUT = "fingerprint-1", "latent-v1:L=3:D=40:float32:page=64"


def advert(instance: str, keys: list[bytes], fingerprint: str = FP) -> bytes:
    return control_pb2.PrefixCacheKeys(
        instance_id=instance, model_fingerprint=fingerprint, kv_layout=LAYOUT,
        key_prefixes=b"".join(k[:16] for k in keys)).SerializeToString()


def test_counts_whole_pages_from_token_zero_per_instance():
    now = [100.0]
    view = PrefixCacheView(lambda: now[0], stale_after_s=10)
    prompt = list(range(1000, 1000 + 200))  # 3 full pages
    keys = page_keys(namespace_key(FP, LAYOUT), prompt)
    view.on_message(advert("prefill-0", keys[:2]))
    view.on_message(advert("prefill-1", [keys[0], keys[2]]))  # page 1 missing: only page 0
    view.on_message(advert("prefill-2", keys, fingerprint="another model"))
    assert view.cached_tokens(prompt) == {"prefill-0": 128, "prefill-1": 64}
    assert view.cached_tokens(prompt[:63]) == {}
    assert view.cached_tokens(prompt, tenant="acme") == {}  # another tenant's namespace
    now[0] = 111.0
    assert view.cached_tokens(prompt) == {}


def test_ignores_unreadable_and_misshapen_messages():
    view = PrefixCacheView(lambda: 0.0)
    view.on_message(b"\xff\xff not a protobuf")
    view.on_message(control_pb2.PrefixCacheKeys(instance_id="p", key_prefixes=b"123").SerializeToString())
    view.on_message(control_pb2.PrefixCacheKeys(key_prefixes=b"x" * 16).SerializeToString())
    assert view.cached_tokens(list(range(64))) == {}
