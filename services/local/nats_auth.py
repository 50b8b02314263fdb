"""NATS with TLS and one user per role: the config blocks and the permission sets (pure).

Clients must present a certificate signed by the mesh CA (`verify_and_map`): nats-server maps
it to the user named like its role's DNS SAN (`decode.role.epserve`, services/common/certs.py),
so no password is handed out and a certificate of one role cannot act as another. What each
role may publish and subscribe to:

- every role: its own heartbeats (`epserve.heartbeat.<role>.>`), the JetStream API it needs
  to open buckets, read and watch keys (`$JS.API.>` minus deleting, purging or re-configuring
  a stream, and minus reading the usage stream and the API-key bucket), flow control, and
  replies on `_INBOX.>`;
- scheduler: the only writer of membership, topology and overlap plan (`$KV.epserve_members`,
  `$KV.epserve_topology`, `$KV.epserve_plan`); hears heartbeats and expert loads;
- router: publishes usage records; hears heartbeats and prefix-cache adverts; reads API keys;
- ledger: consumes the usage stream (and acks it), writes its own bucket; hears heartbeats;
- expert-worker: publishes its expert loads; prefill: its prefix-cache adverts, and hears
  decode heartbeats (which decode instances it may push KV to);
- operator (`epserve keys`, `economics live`, tests): everything.

Partial: `_INBOX.>` is shared (a role could listen for another's replies, not forge them),
KV reads other than the usage stream and the API keys are open to every role, and the
JetStream cluster's routes between NATS nodes are plaintext (loopback locally).
"""

from __future__ import annotations

import json
from pathlib import Path

from services.common import subjects
from services.common.certs import CA_FILE, CERT_FILE, KEY_FILE, role_dns_name

HEARTBEATS = subjects.HEARTBEAT_ALL
INBOX = "_INBOX.>"


def _kv(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def _stream_reads(stream: str) -> list[str]:
    """The JetStream API subjects that read a stream's messages."""
    return [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>"]


# Changing a stream under the others: only the operator.
JS_ADMIN = ["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.UPDATE.>",
            "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.STREAM.SNAPSHOT.>",
            "$JS.API.STREAM.RESTORE.>", "$JS.API.ACCOUNT.PURGE.>"]
USAGE_READS = _stream_reads(subjects.USAGE_STREAM)
API_KEY_READS = _stream_reads(f"KV_{subjects.API_KEYS_BUCKET}")

# role -> (publish allow, publish deny, subscribe allow)
_EXTRA: dict[str, tuple[list[str], list[str], list[str]]] = {
    "scheduler": ([_kv(subjects.MEMBERS_BUCKET), _kv(subjects.TOPOLOGY_BUCKET),
                   _kv(subjects.PLAN_BUCKET)], USAGE_READS + API_KEY_READS,
                  [HEARTBEATS, subjects.EXPERT_LOAD_ALL]),
    "router": ([subjects.USAGE_SUBJECT], USAGE_READS,
               [HEARTBEATS, subjects.PREFIX_CACHE_ALL]),
    "ledger": ([_kv(subjects.LEDGER_BUCKET), f"$JS.ACK.{subjects.USAGE_STREAM}.>"],
               API_KEY_READS, [HEARTBEATS]),
    "prefill": ([subjects.PREFIX_CACHE_ALL], USAGE_READS + API_KEY_READS,
                [subjects.heartbeat("decode", ">")]),
    "decode": ([], USAGE_READS + API_KEY_READS, []),
    "expert-worker": ([subjects.EXPERT_LOAD_ALL], USAGE_READS + API_KEY_READS, []),
}
SERVICE_ROLES = tuple(_EXTRA)
OPERATOR = "operator"


def permissions(role: str) -> dict:
    """nats-server `permissions` for a service role (the operator has none: all allowed)."""
    extra_pub, deny_pub, extra_sub = _EXTRA[role]
    return {
        "publish": {"allow": [subjects.heartbeat(role, ">"), "$JS.API.>", "$JS.FC.>",
                              *extra_pub],
                    "deny": [*JS_ADMIN, *deny_pub]},
        "subscribe": {"allow": [INBOX, *extra_sub]},
    }


def users() -> list[dict]:
    return ([{"user": role_dns_name(r), "permissions": permissions(r)} for r in SERVICE_ROLES]
            + [{"user": role_dns_name(OPERATOR)}])


def render_tls(identity_dir: str | Path, indent: int | None = None) -> list[str]:
    """The config lines: TLS with the server's certificate, client certificates required and
    mapped to users, and the users with their permissions (JSON is valid NATS config; `indent`
    spreads it over lines, for a config people read)."""
    d = Path(identity_dir)
    return [
        "tls {",
        f"  cert_file: {json.dumps(str(d / CERT_FILE))}",
        f"  key_file: {json.dumps(str(d / KEY_FILE))}",
        f"  ca_file: {json.dumps(str(d / CA_FILE))}",
        "  verify_and_map: true",
        "  timeout: 5",
        "}",
        *f"authorization {{ users: {json.dumps(users(), indent=indent)} }}".splitlines(),
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m services.local.nats_auth DIR`: the lines for a server whose identity is in DIR
    (deploy/k8s/nats.yaml's config embeds them for /etc/nats-tls; a test checks they match)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m services.local.nats_auth")
    p.add_argument("identity_dir", help="where the NATS server's tls.crt, tls.key, ca.crt are")
    args = p.parse_args(argv)
    print("\n".join(render_tls(args.identity_dir, indent=2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
