"""`epserve keys create|list|revoke`: API keys in the cluster's JetStream KV (hashed).

A key is printed once, by `create`; the bucket keeps its sha256 only. Routers started with
`--api-keys` pick up a new key on its first use and a revocation within two seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import nats

from services.auth.api_keys import ApiKeyRecord, KeyLimits, new_key
from services.auth.keyring import open_keys_bucket, read_records
from services.common.control import nats_servers
from services.common.errors import CliError
from services.common.mesh_tls import TLS_DIR_ENV, TLS_DIR_HELP, nats_tls_options

TIMEOUT_S = 10.0


def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="API keys: create, list, revoke")
    sub = p.add_subparsers(dest="keys_command", required=True)
    for name, text in (("create", "make a key (printed once)"), ("list", "every key, no secrets"),
                       ("revoke", "revoke a key by its id")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--nats-url", default=os.environ.get("EPSERVE_NATS_URL",
                                                             "nats://127.0.0.1:4222"))
        sp.add_argument("--json", action="store_true")
        sp.add_argument("--tls-dir", default=os.environ.get(TLS_DIR_ENV, ""), help=TLS_DIR_HELP)
        sp.set_defaults(func=lambda args, name=name: asyncio.run(_run(name, args)))
        if name == "create":
            sp.add_argument("--tenant", required=True, help="who is billed (usage records)")
            sp.add_argument("--name", default="", help="a label")
            sp.add_argument("--requests-per-s", type=float, default=0.0, help="0 = unlimited")
            sp.add_argument("--tokens-per-min", type=int, default=0, help="0 = unlimited")
            sp.add_argument("--max-concurrent", type=int, default=0, help="0 = unlimited")
            sp.add_argument("--max-reserved-tokens", type=int, default=0,
                            help="cap on prompt + max_tokens over the key's requests in flight "
                                 "(the KV decode reserves); 0 = unlimited")
        if name == "revoke":
            sp.add_argument("key_id", help="the id (`list` shows it; ep-<id>-...)")


async def _run(command: str, args: argparse.Namespace) -> int:
    try:
        nc = await asyncio.wait_for(nats.connect(servers=nats_servers(args.nats_url),
                                                 connect_timeout=TIMEOUT_S,
                                                 allow_reconnect=False,
                                                 **nats_tls_options(args.tls_dir)),
                                    TIMEOUT_S + 1)
    except Exception as exc:
        raise CliError(f"cannot reach NATS at {args.nats_url}: {type(exc).__name__}: {exc}"
                       ) from None
    try:
        kv = await asyncio.wait_for(open_keys_bucket(nc.jetstream()), TIMEOUT_S)
        if command == "create":
            return await _create(kv, args)
        if command == "list":
            records = await read_records(kv, TIMEOUT_S)
            rows = [_public(r) for r in sorted(records.values(), key=lambda r: r.created_at)]
            print(json.dumps(rows, indent=2) if args.json else "\n".join(
                f"{r['key_id']}  tenant={r['tenant']}  name={r['name'] or '-'}  "
                f"{'REVOKED' if r['revoked_at'] else 'active'}  limits={r['limits']}"
                for r in rows) or "no keys")
            return 0
        return await _revoke(kv, args)
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT_S)


async def _create(kv, args: argparse.Namespace) -> int:
    try:
        limits = KeyLimits(args.requests_per_s, args.tokens_per_min, args.max_concurrent,
                           args.max_reserved_tokens)
        key, record = new_key(args.tenant, time.time(), args.name, limits)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    await asyncio.wait_for(kv.create(record.key_id, record.to_json()), TIMEOUT_S)
    print(json.dumps({"key": key, **_public(record)}) if args.json else
          f"{key}\n(key id {record.key_id}, tenant {record.tenant}; shown once: store it now)")
    return 0


async def _revoke(kv, args: argparse.Namespace) -> int:
    try:
        entry = await asyncio.wait_for(kv.get(args.key_id), TIMEOUT_S)
    except Exception:
        raise CliError(f"no key with id {args.key_id!r}") from None
    record = ApiKeyRecord.from_json(entry.value).revoke(time.time())
    await asyncio.wait_for(kv.update(args.key_id, record.to_json(), last=entry.revision),
                           TIMEOUT_S)
    print(f"revoked {args.key_id} (tenant {record.tenant})")
    return 0


def _public(record: ApiKeyRecord) -> dict:
    return {"key_id": record.key_id, "tenant": record.tenant, "name": record.name,
            "created_at": record.created_at, "revoked_at": record.revoked_at,
            "limits": {"requests_per_s": record.limits.requests_per_s,
                       "tokens_per_min": record.limits.tokens_per_min,
                       "max_concurrent": record.limits.max_concurrent,
                       "max_reserved_tokens": record.limits.max_reserved_tokens}}
