"""The router's key ring against a real nats-server: a key written after the ring's last read
works on its first request whatever the refresh's phase; a revocation takes effect at the next
refresh; an unknown or malformed key is refused without an error from NATS."""

from __future__ import annotations

import pytest

from services.auth.api_keys import new_key
from services.auth.keyring import KeyRing, Unauthenticated, open_keys_bucket
from services.common import control
from services.local.nats_server import NatsServer

pytestmark = pytest.mark.timeout(60)


async def test_a_new_key_works_at_once_and_a_revoked_one_stops(tmp_path):
    server = NatsServer(store_dir=tmp_path / "js")
    nc = ring = None
    try:
        server.start()
        nc = await control.connect(server.url, "test-keyring", timeout=2.0)
        kv = await open_keys_bucket(nc.jetstream(timeout=1.0))
        ring = KeyRing(kv, refresh_s=3600.0)  # no periodic refresh during the test
        await ring.start()
        assert ring.records == {}

        key, record = new_key("acme", now=1.0)
        await kv.put(record.key_id, record.to_json())
        assert (await ring.authenticate(key)).tenant == "acme"  # looked up, not waited for

        other, _ = new_key("acme", now=1.0)  # well formed, never stored
        for refused in (other, "sk-not-ours", None, key[:-1] + ("A" if key[-1] != "A" else "B")):
            with pytest.raises(Unauthenticated):
                await ring.authenticate(refused)

        await kv.put(record.key_id, record.revoke(2.0).to_json())
        assert (await ring.authenticate(key)).tenant == "acme"  # cached until the refresh
        await ring._refresh()
        with pytest.raises(Unauthenticated):
            await ring.authenticate(key)
    finally:
        if ring is not None:
            await ring.stop()
        if nc is not None:
            await nc.close()
        server.stop()
