"""Service-to-service mTLS in deploy/: every `epserve serve` pod mounts its own role's
`kubernetes.io/tls` Secret (and no other) read-only where EPSERVE_TLS_DIR points, the
Secrets `epserve certs --k8s` prints are the ones the pods mount and carry the role each
service checks at start, the NATS certificate answers to every host the services dial, and
the NetworkPolicies let the probes reach the health port. The NATS server's own TLS and users
are checked in test_deploy_manifests_nats.py."""

from __future__ import annotations

import base64
import socket
import ssl
import threading

import pytest

from services.cli.certs import K8S_SECRET_PREFIX
from services.common import control
from services.common.certs import CA_FILE, CERT_FILE, KEY_FILE, role_of
from services.common.mesh_tls import MeshTLS
from tests.unit import deploy_manifests as dm
from tests.unit.deploy_manifests import containers

source, docs, served, k8s_certs = dm.source, dm.docs, dm.served, dm.k8s_certs  # the fixtures

TLS_SECRET_KEYS = {CERT_FILE, KEY_FILE, CA_FILE}  # kubernetes.io/tls: tls.crt, tls.key + ca.crt


def tls_secret_names(docs: list[dict]) -> dict[str, str]:
    """container name -> the epserve-tls-* Secret it mounts (only containers that mount one)."""
    out = {}
    for c in containers(docs, init=True):
        for found in dm.secret_mounts(c).values():
            name = found["volume"]["secret"]["secretName"]
            if name.startswith(K8S_SECRET_PREFIX):
                assert c.name not in out, f"{c.name} mounts two TLS Secrets"
                out[c.name] = name
    return out


def test_mesh_tls_reads_the_files_a_kubernetes_tls_secret_has():
    assert {CERT_FILE, KEY_FILE} == {"tls.crt", "tls.key"} and CA_FILE == "ca.crt"


def test_every_service_mounts_its_own_role_secret_where_tls_dir_points(served):
    for s in served:
        c, cfg = s.container, s.cfg
        assert cfg.tls_dir, f"{c.name}: no EPSERVE_TLS_DIR: the service would run plaintext"
        assert not (cfg.tls_cert or cfg.tls_key or cfg.tls_ca), c.name
        mounts = dm.secret_mounts(c)
        assert list(mounts) == [cfg.tls_dir], f"{c.name}: secret mounts {list(mounts)}"
        mount, volume = mounts[cfg.tls_dir]["mount"], mounts[cfg.tls_dir]["volume"]
        assert mount.get("readOnly") is True, c.name
        assert "subPath" not in mount, f"{c.name}: a subPath mount never sees a renewed Secret"
        secret = volume["secret"]
        assert secret["secretName"] == K8S_SECRET_PREFIX + s.service, c.name
        assert "items" not in secret, f"{c.name}: every key of the Secret (MeshTLS.from_dir)"
        # the key: readable by the pod's group only, which the service runs as
        assert secret["defaultMode"] == 0o440, c.name
        pod_sc = c.pod["spec"]["securityContext"]
        assert pod_sc["fsGroup"] == pod_sc["runAsGroup"], c.name


def test_only_the_service_containers_and_nats_mount_tls_secrets(docs, served):
    mounted = tls_secret_names(docs)
    want = {s.container.name: K8S_SECRET_PREFIX + s.service for s in served}
    want["StatefulSet/epserve-nats/nats"] = K8S_SECRET_PREFIX + "nats"
    assert mounted == want  # no init container or job holds a mesh key, no pod another's


def test_probes_reach_the_health_port_through_the_network_policies(docs, served):
    """Kubelet probes come from the node; a policy that selected a pod and left its health port
    out would leave the pod unready wherever the CNI enforces it for node traffic."""
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    for s in served:
        labels = s.container.pod["metadata"]["labels"]
        selecting = [p for p in policies
                     if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()]
        assert any("Ingress" in p["spec"]["policyTypes"] for p in selecting), (
            f"{s.container.name}: no policy selects it (default deny?)")
        open_to_all = {port["port"] for p in selecting for rule in p["spec"].get("ingress", [])
                       if "from" not in rule for port in rule.get("ports", [])}
        assert s.cfg.health_port in open_to_all, s.container.name
        assert s.cfg.metrics_port in open_to_all, s.container.name
        if s.service not in ("router",):  # the mesh port: only from peers (mTLS on top)
            assert s.cfg.port not in open_to_all, s.container.name


def test_certs_k8s_prints_the_secrets_the_pods_mount(docs, k8s_certs):
    mounted = set(tls_secret_names(docs).values())
    assert mounted <= set(k8s_certs.secrets), mounted - set(k8s_certs.secrets)
    for name, secret in k8s_certs.secrets.items():
        assert secret["kind"] == "Secret" and secret["type"] == "kubernetes.io/tls", name
        assert secret["metadata"]["namespace"] == k8s_certs.namespace, name
        assert set(secret["data"]) == TLS_SECRET_KEYS, name
        pem = base64.b64decode(secret["data"][CERT_FILE])
        role = name.removeprefix(K8S_SECRET_PREFIX)
        assert role_of(pem) == (role, role), name  # what Service._check_identity compares
    # the files `--out` keeps are the Secrets' (the operator's identity for `epserve keys`)
    decode = k8s_certs.secrets[K8S_SECRET_PREFIX + "decode"]["data"]
    for key in TLS_SECRET_KEYS:
        assert base64.b64decode(decode[key]) == (k8s_certs.out / "decode" / key).read_bytes()
    assert MeshTLS.from_dir(k8s_certs.out / "operator").role == "operator"


def _handshake(server_dir, client: ssl.SSLContext, hostname: str) -> None:
    """A real TLS handshake with the NATS certificate on loopback, the client checking
    `hostname` as nats-py does (the URL's host)."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                            cafile=str(server_dir / CA_FILE))
    server_ctx.load_cert_chain(server_dir / CERT_FILE, server_dir / KEY_FILE)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    failure: list[BaseException] = []

    def serve():
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError) as exc:
            failure.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as raw:
            with client.wrap_socket(raw, server_hostname=hostname):
                pass
    finally:
        thread.join(5)
        listener.close()
    assert not failure, failure


def test_the_nats_certificate_answers_to_every_host_the_services_dial(served, k8s_certs):
    client = MeshTLS.from_dir(k8s_certs.out / "router").ssl_context()  # as a service connects
    hosts = {url.partition("://")[2].rsplit(":", 1)[0]
             for url in control.nats_servers(served[0].cfg.nats_url)}
    hosts |= {"epserve-nats", f"epserve-nats.{k8s_certs.namespace}.svc"}  # the CLI's Service
    for host in sorted(hosts):
        _handshake(k8s_certs.out / "nats", client, host)
    with pytest.raises(ssl.SSLCertVerificationError):  # the check is real: another name fails
        _handshake(k8s_certs.out / "nats", client, "epserve-router")
