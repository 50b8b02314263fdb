"""The NATS part of deploy/: a 3-node JetStream cluster (StatefulSet, headless Service, routes,
`sync_interval: always`, one PVC per node) and every epserve service pointed at all of its
nodes with replicated JetStream state (no cluster needed: the real nats-server binary checks
the config file, and the init containers' wait runs against loopback listeners)."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest

from services.cli.certs import K8S_SECRET_PREFIX
from services.common import control
from services.common.certs import role_dns_name
from services.local.nats_auth import OPERATOR, SERVICE_ROLES, permissions, render_tls, users
from services.local.nats_server import NatsServerError, find_nats_server_binary
from services.local.ports import free_port
from tests.unit import deploy_manifests as dm
from tests.unit.deploy_manifests import containers, resolve_env

source, docs, served, k8s_certs = dm.source, dm.docs, dm.served, dm.k8s_certs  # the fixtures

CONFIG_FILE = "/etc/nats/nats.conf"


def nats_statefulset(docs: list[dict]) -> dict:
    return next(d for d in docs if d.get("kind") == "StatefulSet"
                and d["metadata"]["name"] == "epserve-nats")


def nats_container(docs: list[dict]) -> dm.Container:
    return next(c for c in containers(docs) if c.workload is nats_statefulset(docs))


def nats_config(docs: list[dict]) -> str:
    """The nats.conf the pods run: the ConfigMap file mounted where --config points."""
    c = nats_container(docs)
    argv = c.argv
    path = argv[argv.index("--config") + 1]
    mount = next(m for m in c.spec["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in c.pod["spec"]["volumes"] if v["name"] == mount["name"])
    data = dm.config_maps(docs)[volume["configMap"]["name"]]
    return data[path.removeprefix(mount["mountPath"] + "/")]


def nats_tls_mount(docs: list[dict]) -> str:
    """Where the NATS pods mount the server's certificate Secret (epserve-tls-nats)."""
    [(path, found)] = dm.secret_mounts(nats_container(docs)).items()
    assert found["volume"]["secret"]["secretName"] == K8S_SECRET_PREFIX + "nats"
    assert found["mount"].get("readOnly") is True
    return path


def generated_auth(config: str) -> list[str]:
    """The config's lines between `# BEGIN nats_auth` and `# END nats_auth`."""
    lines = config.splitlines()
    begin, end = lines.index("# BEGIN nats_auth"), lines.index("# END nats_auth")
    return lines[begin + 1:end]


def block(config: str, name: str) -> str:
    """The text of a top-level `name { ... }` block (no nested braces in ours)."""
    found = re.search(rf"^{name}\s*\{{(.*?)^\}}", config, re.M | re.S)
    assert found, f"no {name} block in the NATS config"
    return found.group(1)


def pod_hosts(docs: list[dict]) -> list[str]:
    """<pod>.<headless Service> of every NATS pod, by ordinal."""
    sts = nats_statefulset(docs)
    name, governing = sts["metadata"]["name"], sts["spec"]["serviceName"]
    return [f"{name}-{i}.{governing}" for i in range(sts["spec"]["replicas"])]


def port_of(c: dm.Container, name: str) -> int:
    return c.ports()[name]


def test_nats_url_names_the_nats_service(docs, served):
    nats_url = served[0].cfg.nats_url
    sts = nats_statefulset(docs)
    headless = next(d for d in docs if d.get("kind") == "Service"
                    and d["metadata"]["name"] == sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    hosts = []
    for url in control.nats_servers(nats_url):
        scheme, _, hostport = url.partition("://")
        assert scheme == "tls", f"{url}: the server requires TLS"
        host, port = hostport.split(":")
        hosts.append(host)
        assert int(port) in {p["port"] for p in headless["spec"]["ports"]}
        assert int(port) == port_of(nats_container(docs), "client")
    assert hosts == pod_hosts(docs), "the URL lists every NATS pod"
    # JetStream on, its store on the pod's PVC
    jetstream = block(nats_config(docs), "jetstream")
    assert re.search(r'^\s*store_dir:\s*"?/data"?\s*$', jetstream, re.M)
    mounts = {m["mountPath"]: m["name"] for m in nats_container(docs).spec["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims


def test_nats_is_a_three_node_statefulset_with_a_volume_each(docs):
    sts = nats_statefulset(docs)
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    c = nats_container(docs)
    assert c.argv == ["nats-server", "--config", CONFIG_FILE]
    env = resolve_env(c, docs)
    assert env["SERVER_NAME"] == "epserve-nats-0"  # the pod name (a stand-in here)
    assert {"client", "cluster", "monitor"} <= set(c.ports())
    headless = next(d for d in docs if d.get("kind") == "Service"
                    and d["metadata"]["name"] == sts["spec"]["serviceName"])
    assert headless["spec"].get("publishNotReadyAddresses") is True  # peers find each other
    assert {p["port"] for p in headless["spec"]["ports"]} >= {
        port_of(c, "client"), port_of(c, "cluster")}
    [pdb] = [d for d in docs if d.get("kind") == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1  # 2 of 3 stay: the JetStream quorum
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        sts["spec"]["template"]["metadata"]["labels"].items())


def test_nats_config_fsyncs_and_routes_to_every_pod(docs, tmp_path, k8s_certs):
    config = nats_config(docs)
    assert re.search(r"^\s*sync_interval:\s*always\s*$", block(config, "jetstream"), re.M)
    assert re.search(r"^server_name:\s*\$SERVER_NAME\s*$", config, re.M)
    cluster = block(config, "cluster")
    cluster_port = port_of(nats_container(docs), "cluster")
    assert re.search(rf'^\s*listen:\s*"0\.0\.0\.0:{cluster_port}"', cluster, re.M)
    routes = re.findall(r'"(nats(?:-route)?://[^"]+)"', cluster)
    assert routes == [f"nats://{h}:{cluster_port}" for h in pod_hosts(docs)]

    try:
        binary = find_nats_server_binary()
    except NatsServerError:
        pytest.skip("no nats-server binary")
    path = tmp_path / "nats.conf"
    # the server's certificate where the pods mount it, here a real one (`epserve certs --k8s`)
    path.write_text(config.replace(nats_tls_mount(docs) + "/", str(k8s_certs.out / "nats") + "/"))
    out = subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True,
                         timeout=30, env={"SERVER_NAME": "epserve-nats-0"})
    assert out.returncode == 0, out.stdout + out.stderr  # the real server accepts it


def test_every_service_gets_replicated_state_on_every_node(docs, served, monkeypatch):
    nodes = nats_statefulset(docs)["spec"]["replicas"]
    for s in served:
        replicas = s.env.get(control.REPLICAS_ENV)
        assert replicas == "3", f"{s.container.name}: {control.REPLICAS_ENV}={replicas}"
        monkeypatch.setenv(control.REPLICAS_ENV, replicas)
        assert control.default_replicas() == 3 <= nodes
        assert len(control.nats_servers(s.cfg.nats_url)) == nodes, s.container.name


def wait_for_nats_scripts(docs: list[dict]) -> list[str]:
    out = []
    for c in containers(docs, init=True):
        if c.spec["name"] == "wait-for-nats":
            assert c.argv[:2] == ["python", "-c"], c.name
            out.append(c.argv[2])
    return out


def test_init_containers_wait_for_a_quorum_of_nats_nodes(docs, served):
    scripts = wait_for_nats_scripts(docs)
    assert len(scripts) == len(served) and len(set(scripts)) == 1
    ports = [free_port() for _ in range(3)]
    url = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    listeners = []
    try:
        listeners.append(socket.create_server(("127.0.0.1", ports[0])))
        with pytest.raises(subprocess.TimeoutExpired):  # 1 of 3 up: no quorum, keeps waiting
            subprocess.run([sys.executable, "-c", scripts[0]], env={"EPSERVE_NATS_URL": url},
                           capture_output=True, timeout=3)
        listeners.append(socket.create_server(("127.0.0.1", ports[2])))
        out = subprocess.run([sys.executable, "-c", scripts[0]], env={"EPSERVE_NATS_URL": url},
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr  # 2 of 3: on to the service
        assert f"127.0.0.1:{ports[1]}" in out.stdout  # it said what it was waiting for
    finally:
        for sock in listeners:
            sock.close()


def test_nats_config_requires_tls_and_maps_each_role_to_its_user(docs):
    """The TLS and authorization lines are nats_auth.py's, for where the certificate is mounted:
    one source of truth with the local NATS (regenerate with the command in nats.yaml)."""
    config = nats_config(docs)
    mount = nats_tls_mount(docs)
    want = render_tls(mount, indent=2)
    assert generated_auth(config) == want, (
        f"deploy/k8s/nats.yaml's nats_auth lines differ from "
        f"`python -m services.local.nats_auth {mount}`")
    tls = block(config, "tls")
    assert re.search(r"^\s*verify_and_map:\s*true\s*$", tls, re.M)  # client certs required
    for name in ("cert_file", "key_file", "ca_file"):
        assert re.search(rf'^\s*{name}:\s*"{re.escape(mount)}/', tls, re.M), name
    # the authorization parsed back: one user per role, with nats_auth.py's permissions
    text = "\n".join(want)
    users_json = text[text.index("users:") + len("users:"):text.rindex("}")]
    by_user = {u["user"]: u.get("permissions") for u in json.loads(users_json)}
    assert by_user == {u["user"]: u.get("permissions") for u in users()}
    for role in (*SERVICE_ROLES, OPERATOR):
        assert role_dns_name(role) in by_user, role
    assert set(dm.CONFIGS) <= set(SERVICE_ROLES)  # every service in deploy/ has a NATS user
    assert by_user[role_dns_name("decode")] == permissions("decode")
    assert "$JS.API.STREAM.DELETE.>" in by_user[role_dns_name("router")]["publish"]["deny"]


def test_the_nats_config_enforces_roles_on_a_real_server(docs, k8s_certs, tmp_path):
    """The manifest's config (client part: its cluster block dropped, on loopback) run by the
    real nats-server: no certificate, no connection; a decode certificate publishes decode
    heartbeats but not the scheduler's topology, over a tls:// URL as the services use."""
    import asyncio

    try:
        binary = find_nats_server_binary()
    except NatsServerError:
        pytest.skip("no nats-server binary")
    from services.common.mesh_tls import MeshTLS
    config = nats_config(docs)
    config = re.sub(r"^cluster\s*\{.*?^\}\n", "", config, flags=re.M | re.S)
    port, monitor = free_port(), free_port()
    config = (config.replace('listen: "0.0.0.0:4222"', f'listen: "127.0.0.1:{port}"')
              .replace('http: "0.0.0.0:8222"', f'http: "127.0.0.1:{monitor}"')
              .replace('store_dir: "/data"', f'store_dir: "{tmp_path / "store"}"')
              .replace(nats_tls_mount(docs) + "/", str(k8s_certs.out / "nats") + "/"))
    assert f"127.0.0.1:{port}" in config and str(k8s_certs.out) in config
    path = tmp_path / "nats.conf"
    path.write_text(config)
    proc = subprocess.Popen([binary, "-c", str(path)], env={"SERVER_NAME": "epserve-nats-0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no nats-server"
                time.sleep(0.1)
        decode = MeshTLS.from_dir(k8s_certs.out / "decode").ssl_context()
        url = f"tls://localhost:{port}"  # localhost: a SAN of every certificate

        async def check():
            import nats
            # no client certificate: the server drops the connection (TLS 1.3: after the
            # client's side of the handshake, so a reset rather than an alert, or either)
            with pytest.raises((ConnectionError, ssl.SSLError)) as refused:
                bare = ssl.create_default_context(cafile=str(k8s_certs.out / "ca.crt"))
                await nats.connect(url, tls=bare, connect_timeout=3,
                                   max_reconnect_attempts=0, allow_reconnect=False)
            assert not isinstance(refused.value, ssl.SSLCertVerificationError), refused.value
            errors = []

            async def on_error(exc):
                errors.append(str(exc))

            nc = await nats.connect(url, tls=decode, connect_timeout=3, error_cb=on_error,
                                    allow_reconnect=False)
            try:
                await nc.publish("epserve.heartbeat.decode.d-0", b"ok")
                await nc.flush(timeout=3)
                assert not errors, errors
                await nc.publish("$KV.epserve_topology.current", b"forged")
                await nc.flush(timeout=3)
                for _ in range(30):
                    if errors:
                        break
                    await asyncio.sleep(0.1)
                assert any("permissions violation" in e.lower() for e in errors), errors
            finally:
                await nc.close()

        asyncio.run(check())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
