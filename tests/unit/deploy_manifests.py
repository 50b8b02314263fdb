"""Shared helpers of the deploy/ manifest tests (test_deploy_manifests*.py): loading the YAML
(as files and as kustomize renders it), pods and containers, the environment the kubelet builds,
a fake `epserve` for the shell entrypoints, and the `epserve serve` containers' settings.

The fixtures `source`, `docs` and `served` are imported by the test modules.
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
from services.common.settings import settings_from
from services.decode.config import DecodeConfig
from services.expert_worker.config import ExpertWorkerConfig
from services.ledger.config import LedgerConfig
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
    "ledger": LedgerConfig,
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
# TLS: the Secrets `epserve certs --k8s` prints, and the ones the pods mount


def secret_mounts(c: Container) -> dict[str, dict]:
    """mountPath -> {"mount": the volumeMount, "volume": its secret volume} for the container's
    mounts of Secret volumes."""
    volumes = {v["name"]: v for v in c.pod["spec"].get("volumes", [])}
    for claim in c.workload["spec"].get("volumeClaimTemplates", []):  # a StatefulSet's PVCs
        volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim}
    out = {}
    for m in c.spec.get("volumeMounts", []):
        volume = volumes.get(m["name"])
        assert volume is not None, f"{c.name}: mount {m['name']!r} names no volume"
        if "secret" in volume:
            out[m["mountPath"]] = {"mount": m, "volume": volume}
    return out


@dataclass
class K8sCerts:
    out: Path  # what `epserve certs --out OUT --k8s` wrote: OUT/<role>/{tls.crt,tls.key,ca.crt}
    secrets: dict[str, dict]  # Secret name -> the manifest it printed
    namespace: str


@pytest.fixture(scope="session")
def k8s_certs(tmp_path_factory) -> K8sCerts:
    """`epserve certs --k8s` run once, through the real CLI, with the kustomization's namespace."""
    import contextlib
    import io

    from services.cli import main as cli_main
    namespace = load_docs(K8S / "kustomization.yaml")[0]["namespace"]
    out = tmp_path_factory.mktemp("k8s-certs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["certs", "--out", str(out), "--k8s", "--namespace", namespace]) == 0
    docs = [d for d in yaml.safe_load_all(printed.getvalue()) if d is not None]
    return K8sCerts(out, {d["metadata"]["name"]: d for d in docs}, namespace)
