"""`epserve certs`: the mesh CA and a certificate per service identity (services/common/certs.py).

Locally (the default) one identity per process, named as `epserve up` names them
(scheduler, ledger, expert-worker-<r>, prefill-<i>, decode-<i>, router-<i>), plus `nats` (the
NATS server) and `operator` (the CLI: `epserve keys --tls-dir OUT/operator`). Each goes in
OUT/<name>/{tls.crt,tls.key,ca.crt}: pass `--tls-dir OUT/<name>` to `epserve serve`.

`--k8s`: one identity per role (every replica of a Deployment mounts the same Secret), with
SANs for the role's Service DNS names in `--namespace`, printed as one `kubernetes.io/tls`
Secret per role, `epserve-tls-<role>` (`epserve certs --out DIR --k8s | kubectl apply -f -`);
the manifests in deploy/k8s mount them at /etc/epserve/tls (the NATS pods: epserve-tls-nats at
/etc/nats-tls; that certificate also names each of the `--nats-nodes` pods, as the services'
EPSERVE_NATS_URL does).

The CA key stays in OUT/ca.key, and a second run reuses it (new certificates, same CA).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from services.common.certs import CA_FILE, CERT_FILE, KEY_FILE, Identity, make_certs

K8S_SECRET_PREFIX = "epserve-tls-"
# role -> the Kubernetes Service in deploy/k8s that fronts it ("" none: pods are dialled by IP)
K8S_SERVICES = {"router": "epserve-router", "scheduler": "", "ledger": "", "prefill": "",
                "decode": "", "expert-worker": "epserve-expert-worker", "nats": "epserve-nats",
                "operator": ""}
# The NATS StatefulSet's pods, as EPSERVE_NATS_URL (deploy/k8s/configmap.yaml) names them:
# <pod>.<headless Service>, a name too short for a wildcard SAN, so each pod is listed.
K8S_NATS_STATEFULSET, K8S_NATS_HEADLESS = "epserve-nats", "epserve-nats-headless"


def register(subparsers) -> None:
    p = subparsers.add_parser("certs", help="make the mesh CA and per-service certificates")
    p.add_argument("--out", required=True, help="directory (the CA is kept when present)")
    p.add_argument("--prefill", type=int, default=1, help="prefill identities (local)")
    p.add_argument("--decode", type=int, default=1, help="decode identities (local)")
    p.add_argument("--expert-workers", type=int, default=4, help="expert-worker identities")
    p.add_argument("--routers", type=int, default=1, help="router identities (local)")
    p.add_argument("--dns", action="append", default=[], help="extra DNS SAN on every cert")
    p.add_argument("--ip", action="append", default=[], help="extra IP SAN on every cert")
    p.add_argument("--days", type=int, default=825, help="certificate lifetime")
    p.add_argument("--k8s", action="store_true",
                   help="one identity per role with the Kubernetes DNS names; print Secrets")
    p.add_argument("--namespace", default="epserve", help="Kubernetes namespace (--k8s)")
    p.add_argument("--nats-nodes", type=int, default=3,
                   help="NATS StatefulSet replicas, named in the NATS certificate (--k8s)")
    p.add_argument("--json", action="store_true", help="print name -> directory as JSON")
    p.set_defaults(func=_run)


def local_identities(args) -> list[Identity]:
    extra = {"dns_names": tuple(args.dns), "ips": tuple(args.ip)}
    names = (["scheduler", "ledger"] + [f"expert-worker-{r}" for r in range(args.expert_workers)]
             + [f"prefill-{i}" for i in range(args.prefill)]
             + [f"decode-{i}" for i in range(args.decode)]
             + [f"router-{i}" for i in range(args.routers)])
    out = [Identity(n, n.rpartition("-")[0] if n[-1].isdigit() else n, n, **extra) for n in names]
    return out + [Identity("nats", "nats", "nats", **extra),
                  Identity("operator", "operator", "operator", **extra)]


def k8s_dns_names(service: str, namespace: str) -> tuple[str, ...]:
    if not service:
        return ()
    full = f"{service}.{namespace}.svc.cluster.local"
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc", full,
            f"*.{full}", f"*.{service}.{namespace}.svc")  # StatefulSet pods by name


def k8s_nats_dns_names(nodes: int, namespace: str) -> tuple[str, ...]:
    """The NATS pods through the headless Service: each short name, and the longer forms."""
    pods = tuple(f"{K8S_NATS_STATEFULSET}-{i}.{K8S_NATS_HEADLESS}" for i in range(nodes))
    return (*pods, *(f"{pod}.{namespace}" for pod in pods),
            *k8s_dns_names(K8S_NATS_HEADLESS, namespace))


def k8s_identities(args) -> list[Identity]:
    def extra(role: str) -> tuple[str, ...]:
        return k8s_nats_dns_names(args.nats_nodes, args.namespace) if role == "nats" else ()

    return [Identity(role, role, role,
                     dns_names=(*k8s_dns_names(service, args.namespace), *extra(role),
                                *args.dns),
                     ips=tuple(args.ip))
            for role, service in K8S_SERVICES.items()]


def secret_manifest(role: str, directory: Path, namespace: str) -> dict:
    def b64(name: str) -> str:
        return base64.b64encode((directory / name).read_bytes()).decode()

    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": K8S_SECRET_PREFIX + role, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "epserve",
                                    "app.kubernetes.io/component": role}},
            "data": {CERT_FILE: b64(CERT_FILE), KEY_FILE: b64(KEY_FILE), CA_FILE: b64(CA_FILE)}}


def _run(args: argparse.Namespace) -> int:
    identities = k8s_identities(args) if args.k8s else local_identities(args)
    dirs = make_certs(args.out, identities, days=args.days)
    if args.k8s:
        import yaml
        print(yaml.safe_dump_all([secret_manifest(r, d, args.namespace) for r, d in dirs.items()],
                                 sort_keys=False), end="")
    elif args.json:
        print(json.dumps({"ca": str(Path(args.out) / CA_FILE),
                          "identities": {n: str(d) for n, d in dirs.items()}}, indent=2))
    else:
        print(f"CA {Path(args.out) / CA_FILE} (its key: ca.key, keep it private)")
        for name, d in dirs.items():
            print(f"  {name:<18} --tls-dir {d}")
    return 0
