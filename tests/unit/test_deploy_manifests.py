"""The Kubernetes manifests under deploy/ (no cluster needed).

Every YAML document parses; every `epserve serve <service>` container builds its service's
settings from its flags and EPSERVE_* variables (the real CLI parser and `settings_from`, with
downward-API values stood in); probes, Services and Prometheus annotations name declared ports;
the expert-worker rank comes from the pod ordinal (the real shell runs the entrypoint); the
demo-model job's script is idempotent. With kubectl on PATH the same checks also run on the
kustomize output of deploy/k8s and deploy/k8s-cpu.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser
from services.cli.serve import SERVICES
from services.common.settings import env_name, settings_from
from services.decode.config import DecodeConfig
from services.expert_worker.config import ExpertWorkerConfig
from services.prefill.config import PrefillConfig
from services.router.config import RouterConfig
from services.scheduler.config import SchedulerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CPU = DEPLOY / "k8s-cpu"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Stand-ins for downward-API values (fieldRef) the kubelet fills in.
FIELD_VALUES = {
    "metadata.name": "{workload}-0",
    "metadata.namespace": "epserve",
    "status.podIP": "10.244.1.7",
    "metadata.labels['apps.kubernetes.io/pod-index']": "0",
}


# `epserve serve <service>` -> its settings dataclass (flags --foo-bar, variables EPSERVE_FOO_BAR)
CONFIGS = {
    "scheduler": SchedulerConfig,
    "router": RouterConfig,
    "prefill": PrefillConfig,
    "decode": DecodeConfig,
    "expert-worker": ExpertWorkerConfig,
}


def config_class(service: str) -> type:
    return CONFIGS[service]


def field_names(service: str) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class(service))}


# ---------------------------------------------------------------------------------------------
# Loading


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def base_docs() -> list[dict]:
    """The documents deploy/k8s/kustomization.yaml lists, plus the demo-model job."""
    kustomization = load_docs(K8S / "kustomization.yaml")[0]
    docs = [d for name in kustomization["resources"] for d in load_docs(K8S / name)]
    return docs + load_docs(K8S / "jobs" / "make-model.yaml")


@functools.cache
def rendered(directory: Path) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH (kustomize rendering)")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d is not None)


SOURCES = {
    "files": lambda: base_docs(),
    "kustomize-k8s": lambda: list(rendered(K8S)),
    "kustomize-k8s-cpu": lambda: list(rendered(CPU)),
}


@pytest.fixture(params=sorted(SOURCES))
def source(request) -> str:
    return request.param


@pytest.fixture
def docs(source) -> list[dict]:
    return SOURCES[source]()


# ---------------------------------------------------------------------------------------------
# Pods and containers


@dataclass
class Container:
    workload: dict
    spec: dict  # the container
    pod: dict  # the pod template

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}/{self.spec['name']}"

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    def ports(self) -> dict[str | int, int]:
        """Declared container ports, by name and by number."""
        out: dict[str | int, int] = {}
        for p in self.spec.get("ports", []):
            out[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
        return out


def containers(docs: list[dict], init: bool = False) -> list[Container]:
    out = []
    for d in docs:
        if d.get("kind") in WORKLOAD_KINDS:
            pod = d["spec"]["template"]
            lists = ("containers", "initContainers") if init else ("containers",)
            for key in lists:
                out += [Container(d, c, pod) for c in pod["spec"].get(key, [])]
    return out


def config_maps(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}


def resolve_env(c: Container, docs: list[dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom, then env on top)."""
    maps = config_maps(docs)
    env: dict[str, str] = {}
    for source in c.spec.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"{c.name}: envFrom names a missing ConfigMap {name!r}"
        env.update(maps[name])
    for var in c.spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            assert path in FIELD_VALUES, f"{c.name}: no stand-in for fieldRef {path!r}"
            env[var["name"]] = FIELD_VALUES[path].format(workload=c.workload["metadata"]["name"])
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            assert key["key"] in maps.get(key["name"], {}), f"{c.name}: {var['name']}: {key}"
            env[var["name"]] = maps[key["name"]][key["key"]]
        else:
            raise AssertionError(f"{c.name}: unsupported valueFrom {ref}")
    return env


# An `epserve` stand-in: logs its argv as one line (arguments ended by \x1f) and, for
# make-model, creates the --out directory with a config.json.
FAKE_EPSERVE = r"""#!/bin/sh
{ for a in "$@"; do printf '%s\037' "$a"; done; printf '\n'; } >> "$FAKE_EPSERVE_LOG"
if [ "$1" = make-model ]; then
  while [ $# -gt 1 ]; do
    if [ "$1" = --out ]; then mkdir -p "$2" && echo '{}' > "$2/config.json"; fi
    shift
  done
fi
"""


def fake_epserve(directory: Path) -> Path:
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "epserve"
    script.write_text(FAKE_EPSERVE)
    script.chmod(0o755)
    return bin_dir


def run_shell(argv: list[str], env: dict[str, str], workdir: Path) -> list[list[str]]:
    """Runs a `sh -c SCRIPT` entrypoint with the fake epserve first on PATH; its invocations."""
    assert argv[0] in ("sh", "/bin/sh") and argv[1] == "-c" and len(argv) == 3, argv
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    log = workdir / "epserve.log"
    log.unlink(missing_ok=True)
    bin_dir = fake_epserve(workdir)
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKE_EPSERVE_LOG": str(log), **env}
    out = subprocess.run([sh, "-c", argv[2]], env=full_env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    if not log.exists():
        return []
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def epserve_argv(c: Container, env: dict[str, str], workdir: Path) -> list[str] | None:
    """argv after `epserve` for a container that runs epserve, else None."""
    argv = c.argv
    if argv[:1] == ["epserve"]:
        return argv[1:]
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        hostname = f"{c.workload['metadata']['name']}-0"
        calls = run_shell(argv, {**env, "HOSTNAME": hostname}, workdir)
        assert len(calls) == 1, f"{c.name}: expected one epserve call, got {calls}"
        return calls[0]
    return None


@dataclass
class Serve:
    container: Container
    service: str
    flags: list[str]
    env: dict[str, str]
    cfg: object


def serve_containers(docs: list[dict], workdir: Path) -> list[Serve]:
    out = []
    for c in containers(docs):
        if c.workload["kind"] == "Job":  # one-off jobs run no service (and the job's script
            continue  # is exercised separately, on a temporary directory)
        env = resolve_env(c, docs)
        argv = epserve_argv(c, env, workdir)
        if not argv or argv[0] != "serve":
            continue
        service = argv[1]
        assert service in CONFIGS, f"{c.name}: unknown service {service!r}"
        ns = build_parser().parse_args(argv)
        out.append(Serve(c, service, argv[2:], env,
                         settings_from(config_class(service), ns, environ=env)))
    return out


_served: dict[str, list[Serve]] = {}


@pytest.fixture
def served(source, docs, tmp_path_factory) -> list[Serve]:
    """The `epserve serve` containers of one source (built once per source)."""
    if source not in _served:
        found = serve_containers(docs, tmp_path_factory.mktemp("served"))
        assert {s.service for s in found} == set(CONFIGS), "every service has a workload"
        _served[source] = found
    return _served[source]


# ---------------------------------------------------------------------------------------------
# Tests


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
        known = {env_name(f) for f in fields}
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
        for probe in PROBES:
            assert c.spec[probe]["grpc"]["port"] == cfg.port, f"{c.name}: {probe}"
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
        assert mounts["/models"].get("readOnly") is True, s.container.name
        volume = next(v for v in s.container.pod["spec"]["volumes"]
                      if v["name"] == mounts["/models"]["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "epserve-models"


def test_nats_url_names_the_nats_service(docs, served):
    nats_url = served[0].cfg.nats_url
    host, port = nats_url.removeprefix("nats://").split(":")
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    assert host in services
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    nats = next(d for d in docs if d.get("kind") == "StatefulSet"
                and d["metadata"]["name"] == "epserve-nats")
    args = nats["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-js" in args and args[args.index("-sd") + 1] == "/data"


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
