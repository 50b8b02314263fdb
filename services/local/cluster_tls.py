"""A local cluster's mesh certificates: made once into its run directory, one per process.

Every process of `epserve up` / LocalCluster gets `--tls-dir RUN/tls/<process name>` (its
role's certificate, instance = the process name), the NATS nodes a `nats` certificate, and
the cluster object itself an `operator` one: what its health checks, the tests and the CLI
present (health, reflection and NATS admin; no data-plane RPC). The files stay for the
cluster's life, so a process the supervisor restarts (same argv) comes back with the same
identity.
"""

from __future__ import annotations

from pathlib import Path

from services.common.certs import Identity, make_certs
from services.common.mesh_tls import MeshTLS

OPERATOR = "operator"
NATS = "nats"


def role_of_process(name: str) -> str:
    """`prefill-1` -> prefill, `expert-worker-0` -> expert-worker, `scheduler` -> scheduler."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


class ClusterTLS:
    def __init__(self, root: str | Path, process_names: list[str], nats_nodes: list[str]) -> None:
        self.root = Path(root)
        identities = [Identity(n, role_of_process(n), n) for n in process_names]
        identities += [Identity(n, NATS, n) for n in nats_nodes]
        identities.append(Identity(OPERATOR, OPERATOR, OPERATOR))
        self.dirs = make_certs(self.root, identities)
        self.operator = MeshTLS.from_dir(self.dirs[OPERATOR])

    def add(self, name: str, role: str) -> str:
        """One more identity (a process started beside the cluster); its name."""
        self.dirs.update(make_certs(self.root, [Identity(name, role, name)]))
        return name

    def dir(self, name: str) -> Path:
        return self.dirs[name]

    def args(self, name: str) -> list[str]:
        """The flags giving process `name` its identity."""
        return ["--tls-dir", str(self.dirs[name])]

    def health(self, name: str) -> tuple[MeshTLS | None, str | None]:
        """What a health check of process `name` presents and expects: the router's server
        is the public API (plaintext), every other one is a mesh server of its role."""
        role = role_of_process(name)
        if role == "router":
            return None, None
        if role == "link-proxy":  # forwards to its expert worker: the handshake is the worker's
            role = "expert-worker"
        return self.operator, role
