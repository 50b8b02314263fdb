"""The Kubernetes manifests under deploy/ (no cluster needed).

Every YAML document parses; every `epserve serve <service>` container builds its service's
settings from its flags and EPSERVE_* variables (the real CLI parser and `settings_from`, with
downward-API values stood in); probes, Services and Prometheus annotations name declared ports;
the expert-worker rank comes from the pod ordinal (the real shell runs the entrypoint); the
demo-model job's script is idempotent. With kubectl on PATH the same checks also run on the
kustomize output of deploy/k8s and deploy/k8s-cpu. The NATS cluster's manifests are checked in
test_deploy_manifests_nats.py; the helpers are in deploy_manifests.py.
"""

from __future__ import annotations

import pytest

from services.cli import build_parser
from services.cli.serve import SERVICES
from services.common.control import REPLICAS_ENV
from services.common.settings import env_name, settings_from
from tests.unit import deploy_manifests as dm
from tests.unit.deploy_manifests import (
    CONFIGS,
    CPU,
    DEPLOY,
    FIELD_VALUES,
    K8S,
    PROBES,
    base_docs,
    config_class,
    config_maps,
    containers,
    field_names,
    load_docs,
    resolve_env,
    run_shell,
    yaml_files,
)

source, docs, served = dm.source, dm.docs, dm.served  # the fixtures

# EPSERVE_* variables that are no service setting: read by the NATS helpers every service
# shares (services/common/control.py), e.g. the JetStream replica count.
NATS_HELPER_VARIABLES = {REPLICAS_ENV}


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_document_parses(path):
    found = load_docs(path)
    assert found, f"{path}: no documents"
    for d in found:
        assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), path
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"], path


def test_configs_are_the_services_settings():
    assert {name: cfg[2] for name, cfg in SERVICES.items()} == {
        name: cls.__name__ for name, cls in CONFIGS.items()}


def test_kustomization_lists_every_manifest():
    listed = load_docs(K8S / "kustomization.yaml")[0]["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    overlay = load_docs(CPU / "kustomization.yaml")[0]
    assert overlay["resources"] == ["../k8s"]
    for patch in overlay["patches"]:
        assert (CPU / patch["path"]).is_file()


def test_flags_and_env_vars_are_settings_of_their_service(served):
    for s in served:
        fields = field_names(s.service)
        for flag in (f for f in s.flags if f.startswith("--")):
            name = flag[2:].split("=", 1)[0].replace("-", "_")
            assert name in fields, f"{s.container.name}: {flag} is no setting of {s.service}"
        known = {env_name(f) for f in fields} | NATS_HELPER_VARIABLES
        unknown = {k for k in s.env if k.startswith("EPSERVE_")} - known
        assert not unknown, f"{s.container.name}: {sorted(unknown)} are no settings of {s.service}"


def test_every_container_env_var_is_a_string(docs):
    """Kubernetes rejects numbers and booleans in env values, ConfigMap data and annotations."""
    for c in containers(docs, init=True):
        for var in c.spec.get("env", []):
            if "value" in var:
                assert isinstance(var["value"], str), f"{c.name}: {var['name']}"
    for d in docs:
        if d.get("kind") == "ConfigMap":
            for key, value in d.get("data", {}).items():
                assert isinstance(value, str), f"ConfigMap {d['metadata']['name']}: {key}"
        for meta in (d.get("metadata", {}),
                     d.get("spec", {}).get("template", {}).get("metadata", {})):
            for key, value in (meta.get("annotations") or {}).items():
                assert isinstance(value, str), f"{d['metadata']['name']}: annotation {key}"


def test_probe_ports_are_declared(docs):
    for c in containers(docs, init=True):
        ports = c.ports()
        for probe in PROBES:
            if probe not in c.spec:
                continue
            handler = next(c.spec[probe][k] for k in ("grpc", "httpGet", "tcpSocket", "exec")
                           if k in c.spec[probe])
            if "port" in handler:
                assert handler["port"] in ports, f"{c.name}: {probe} port {handler['port']}"


def test_serve_containers_probe_serve_and_expose_their_ports(served):
    for s in served:
        c, cfg = s.container, s.cfg
        ports = c.ports()
        assert cfg.host == "0.0.0.0", f"{c.name}: probes and scrapes come from outside the pod"
        assert cfg.port in ports.values(), f"{c.name}: gRPC port {cfg.port} not declared"
        # the main port wants a client certificate (mTLS): probes ask the plaintext health-only
        # server (--health-port), which must be on, on a port of its own, and declared
        assert cfg.health_port > 0 and cfg.health_port not in (cfg.port, cfg.metrics_port), c.name
        assert ports.get("health") == cfg.health_port, f"{c.name}: health port not declared"
        for probe in PROBES:
            assert c.spec[probe]["grpc"]["port"] == cfg.health_port, f"{c.name}: {probe}"
        annotations = c.pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == cfg.metrics_port
        assert cfg.metrics_port in ports.values(), f"{c.name}: metrics port not declared"


def test_termination_grace_covers_the_drain(served):
    for s in served:
        grace = s.container.pod["spec"]["terminationGracePeriodSeconds"]
        assert grace > s.cfg.drain_grace_s + 5, s.container.name  # + gRPC server grace (5 s)
        if s.service in ("router", "decode"):  # in-flight requests end by the request timeout
            router = next(r for r in served if r.service == "router")
            assert grace >= router.cfg.request_timeout_s + s.cfg.drain_grace_s, s.container.name


def test_every_service_shares_nats_and_model(served):
    nats = {s.cfg.nats_url for s in served}
    models = {s.cfg.model for s in served}
    assert len(nats) == 1 and len(models) == 1
    assert next(iter(models)).startswith("/models/")
    for s in served:
        mounts = {m["mountPath"]: m for m in s.container.spec["volumeMounts"]}
        if s.service == "ledger":  # loads no model: only its TLS identity is mounted
            assert set(mounts) == {s.cfg.tls_dir}, s.container.name
            continue
        assert mounts["/models"].get("readOnly") is True, s.container.name
        volume = next(v for v in s.container.pod["spec"]["volumes"]
                      if v["name"] == mounts["/models"]["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "epserve-models"


def test_scheduler_expert_workers_match_the_statefulset(served):
    scheduler = next(s for s in served if s.service == "scheduler")
    worker = next(s for s in served if s.service == "expert-worker")
    assert worker.container.workload["kind"] == "StatefulSet"
    assert worker.container.workload["spec"]["replicas"] == scheduler.cfg.expert_workers
    # a worker takes its placement from the scheduler's topology in NATS, not its own flags
    assert worker.cfg.nats_url and not worker.cfg.placement and not worker.cfg.num_workers
    deployment = scheduler.container.workload
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_gpu_limit_matches_device(served):
    for s in served:
        limits = s.container.spec.get("resources", {}).get("limits", {})
        device = getattr(s.cfg, "device", "cpu")
        if "nvidia.com/gpu" in limits:
            assert int(limits["nvidia.com/gpu"]) == 1 and device == "cuda:0", s.container.name
        else:
            assert device == "cpu", f"{s.container.name}: {device} without a GPU limit"


def test_gpus_by_default_and_none_in_the_cpu_variant(source, served):
    engines = [s for s in served if s.service in ("prefill", "decode", "expert-worker")]
    want = "cpu" if source == "kustomize-k8s-cpu" else "cuda:0"
    assert {s.cfg.device for s in engines} == {want}


def test_instances_advertise_their_pod(served):
    for s in served:
        if s.service not in ("prefill", "decode", "expert-worker"):
            continue
        assert s.cfg.advertise_host == FIELD_VALUES["status.podIP"], s.container.name
        if s.service != "expert-worker":
            name = s.container.workload["metadata"]["name"]
            assert s.cfg.instance_id == FIELD_VALUES["metadata.name"].format(workload=name)


def test_expert_worker_rank_is_the_pod_ordinal(docs, tmp_path):
    worker = next(c for c in containers(docs) if c.spec["name"] == "expert-worker")
    env = resolve_env(worker, docs)
    for ordinal in (0, 3, 12):
        hostname = f"{worker.workload['metadata']['name']}-{ordinal}"
        [argv] = run_shell(worker.argv, {**env, "HOSTNAME": hostname}, tmp_path)
        cfg = settings_from(config_class("expert-worker"), build_parser().parse_args(argv), env)
        assert cfg.rank == ordinal
    assert "exec epserve" in worker.argv[2], "epserve must be PID 1 to get SIGTERM"


def test_services_select_pods_and_target_declared_ports(docs):
    pods = containers(docs)
    for svc in (d for d in docs if d.get("kind") == "Service"):
        selector = svc["spec"]["selector"]
        chosen = [c for c in pods if c.workload["kind"] != "Job" and selector.items()
                  <= c.pod["metadata"]["labels"].items()]
        assert chosen, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in c.ports() for c in chosen), (svc["metadata"]["name"], target)
    router = next(d for d in docs if d.get("kind") == "Service"
                  and d["metadata"]["name"] == "epserve-router")
    assert [p["port"] for p in router["spec"]["ports"]] == [50051]
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if d.get("kind") == "StatefulSet":
            assert d["spec"]["serviceName"] in {
                s["metadata"]["name"] for s in docs if s.get("kind") == "Service"
                and s["spec"].get("clusterIP") == "None"}


def test_make_model_job_writes_the_model_once(tmp_path):
    docs = base_docs()
    job = next(c for c in containers(docs) if c.workload["kind"] == "Job")
    env = resolve_env(job, docs)
    assert env["MODEL_DIR"] == config_maps(docs)["epserve-common"]["EPSERVE_MODEL"]
    mounts = {m["mountPath"] for m in job.spec["volumeMounts"]}
    assert any(env["MODEL_DIR"].startswith(m + "/") for m in mounts)
    model_dir = tmp_path / "models" / "v3-mini"
    model_dir.parent.mkdir()
    [argv] = run_shell(job.argv, {**env, "MODEL_DIR": str(model_dir)}, tmp_path)
    ns = build_parser().parse_args(argv)  # the real CLI accepts it
    assert (ns.command, ns.preset) == ("make-model", "v3-mini")
    assert (model_dir / "config.json").is_file()
    assert run_shell(job.argv, {**env, "MODEL_DIR": str(model_dir)}, tmp_path) == []


def test_images_are_pinned_by_the_kustomization():
    images = {i["name"]: i for i in load_docs(K8S / "kustomization.yaml")[0]["images"]}
    used = {c.spec["image"].split(":")[0] for c in containers(base_docs(), init=True)}
    assert used == set(images)


def test_dockerfile_installs_the_package():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in text and "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "pip install ." in text
    entrypoints = [line for line in text.splitlines() if line.startswith("ENTRYPOINT")]
    assert entrypoints == ['ENTRYPOINT ["epserve"]']
