"""The NATS part of deploy/: a 3-node JetStream cluster (StatefulSet, headless Service, routes,
`sync_interval: always`, one PVC per node) and every epserve service pointed at all of its
nodes with replicated JetStream state (no cluster needed: the real nats-server binary checks
the config file, and the init containers' wait runs against loopback listeners)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from services.common import control
from services.local.nats_server import NatsServerError, find_nats_server_binary
from services.local.ports import free_port
from tests.unit import deploy_manifests as dm
from tests.unit.deploy_manifests import containers, resolve_env

source, docs, served = dm.source, dm.docs, dm.served  # the fixtures

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
        host, port = url.removeprefix("nats://").split(":")
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


def test_nats_config_fsyncs_and_routes_to_every_pod(docs, tmp_path):
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
    path.write_text(config)
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
