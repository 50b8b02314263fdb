"""Mesh certificates (`epserve certs`), identities from flags, and prefill's decode members."""

from __future__ import annotations

import base64
import ipaddress
import json
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from services.cli import main as cli_main
from services.common.certs import Identity, issue, make_ca, make_certs, role_of
from services.common.mesh_tls import MeshTLS, TLSConfigError, from_settings
from services.local.cluster_tls import ClusterTLS, role_of_process
from services.local.nats_auth import permissions, render_tls, users
from services.prefill.decode_members import DecodeMembers
from services.protos_gen.epserve.v1 import control_pb2


def _sans(pem: bytes):
    cert = x509.load_pem_x509_certificate(pem)
    return cert, cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_issued_certificate_names_role_instance_and_hosts():
    ca = make_ca()
    leaf = issue(ca, "decode", "decode-3", dns_names=("decode.epserve.svc",), ips=("10.0.0.7",))
    cert, sans = _sans(leaf.cert_pem)
    assert role_of(leaf.cert_pem) == ("decode", "decode-3")
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://epserve/decode/decode-3"]
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "decode.role.epserve", "localhost", "decode.epserve.svc"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")}
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "decode"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "decode-3"
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)  # raises when not signed by the CA
    assert role_of(ca.cert_pem) is None


@pytest.mark.parametrize("role,instance", [("wizard", "w-0"), ("decode", ""), ("decode", "a/b")])
def test_bad_identities_are_refused(role, instance):
    with pytest.raises(ValueError):
        issue(make_ca(), role, instance)


def test_make_certs_keeps_the_ca_and_keys_private(tmp_path):
    dirs = make_certs(tmp_path, [Identity("prefill-0", "prefill", "prefill-0")])
    ca_before = (tmp_path / "ca.crt").read_bytes()
    more = make_certs(tmp_path, [Identity("decode-0", "decode", "decode-0")])
    assert (tmp_path / "ca.crt").read_bytes() == ca_before  # later certs, same CA
    for d in (dirs["prefill-0"], more["decode-0"]):
        assert stat.S_IMODE((d / "tls.key").stat().st_mode) == 0o600
        assert (d / "ca.crt").read_bytes() == ca_before
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    tls = MeshTLS.from_dir(dirs["prefill-0"])
    assert (tls.role, tls.instance) == ("prefill", "prefill-0")


def test_identity_from_flags(tmp_path):
    d = make_certs(tmp_path, [Identity("router-0", "router", "router-0")])["router-0"]
    assert from_settings() is None
    assert from_settings(tls_dir=str(d)).role == "router"
    assert from_settings(cert=str(d / "tls.crt"), key=str(d / "tls.key"),
                         ca=str(d / "ca.crt")).instance == "router-0"
    with pytest.raises(TLSConfigError, match="go together"):
        from_settings(cert=str(d / "tls.crt"))
    with pytest.raises(TLSConfigError, match="not both"):
        from_settings(tls_dir=str(d), ca=str(d / "ca.crt"))
    with pytest.raises(TLSConfigError, match="cannot read"):
        from_settings(tls_dir=str(tmp_path / "missing"))
    with pytest.raises(TLSConfigError, match="names no epserve role"):
        from_settings(cert=str(tmp_path / "ca.crt"), key=str(tmp_path / "ca.key"),
                      ca=str(tmp_path / "ca.crt"))


def test_service_config_refuses_incomplete_tls_flags(tmp_path):
    from services.common.service import ServiceConfig
    with pytest.raises(ValueError, match="go together"):
        ServiceConfig(model="m", tls_key=str(tmp_path / "k"))


def test_cli_certs_writes_a_ca_and_one_dir_per_identity(tmp_path, capsys):
    out = tmp_path / "certs"
    assert cli_main(["certs", "--out", str(out), "--prefill", "2", "--decode", "1",
                     "--expert-workers", "1", "--routers", "1", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    names = {"scheduler", "ledger", "prefill-0", "prefill-1", "decode-0", "expert-worker-0",
             "router-0", "nats", "operator"}
    assert set(made["identities"]) == names
    for name in names:
        assert MeshTLS.from_dir(out / name).role == role_of_process(name)


def test_cli_certs_k8s_emits_one_secret_per_identity(tmp_path, capsys):
    import yaml
    assert cli_main(["certs", "--out", str(tmp_path), "--k8s", "--namespace", "epserve"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    by_name = {d["metadata"]["name"]: d for d in docs}
    assert {"epserve-tls-prefill", "epserve-tls-decode", "epserve-tls-router",
            "epserve-tls-expert-worker", "epserve-tls-nats"} <= set(by_name)
    secret = by_name["epserve-tls-decode"]
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    pem = base64.b64decode(by_name["epserve-tls-expert-worker"]["data"]["tls.crt"])
    _, sans = _sans(pem)
    assert "epserve-expert-worker.epserve.svc.cluster.local" in sans.get_values_for_type(
        x509.DNSName)
    assert role_of(pem) == ("expert-worker", "expert-worker")
    # pods dialled by IP: the role name (the handshake's check) is what matters
    _, sans = _sans(base64.b64decode(secret["data"]["tls.crt"]))
    assert "decode.role.epserve" in sans.get_values_for_type(x509.DNSName)


def test_role_of_process():
    assert role_of_process("expert-worker-12") == "expert-worker"
    assert role_of_process("scheduler") == "scheduler"
    assert role_of_process("router-bounded") == "router-bounded"


def test_cluster_tls_health_identities(tmp_path):
    tls = ClusterTLS(tmp_path, ["router-0", "decode-0", "expert-worker-0"], ["nats"])
    assert tls.health("router-0") == (None, None)  # the public API: plaintext
    assert tls.health("decode-0") == (tls.operator, "decode")
    assert tls.health("link-proxy-0") == (tls.operator, "expert-worker")
    assert tls.args("decode-0") == ["--tls-dir", str(tmp_path / "decode-0")]


def test_nats_permissions_by_role(tmp_path):
    sched, decode = permissions("scheduler"), permissions("decode")
    assert "$KV.epserve_topology.>" in sched["publish"]["allow"]
    assert not any(s.startswith("$KV.") for s in decode["publish"]["allow"])
    assert "epserve.heartbeat.decode.>" in decode["publish"]["allow"]
    assert "epserve.heartbeat.router.>" not in decode["publish"]["allow"]
    assert "$JS.API.STREAM.DELETE.>" in decode["publish"]["deny"]
    assert "epserve.usage" in permissions("router")["publish"]["allow"]
    assert "epserve.heartbeat.decode.>" in permissions("prefill")["subscribe"]["allow"]
    named = {u["user"]: u for u in users()}
    assert "permissions" not in named["operator.role.epserve"]
    text = "\n".join(render_tls(tmp_path))
    assert "verify_and_map: true" in text and str(tmp_path / "tls.crt") in text


def _hb(endpoint: str, state=control_pb2.STATE_SERVING, role=control_pb2.ROLE_DECODE):
    return control_pb2.Heartbeat(instance_id="d", role=role, endpoint=endpoint, state=state)


def test_decode_members_from_heartbeats():
    m = DecodeMembers(forget_after_s=10.0, clock=lambda: 0.0)
    m.heard(_hb("h:1"), 0.0)
    m.heard(_hb("h:2", role=control_pb2.ROLE_PREFILL), 0.0)  # not a decode instance
    assert m.is_member("h:1", 5.0) and not m.is_member("h:2", 5.0)
    assert not m.is_member("evil:666", 5.0)
    # a NATS outage (no decode heartbeat at all) freezes membership
    assert m.is_member("h:1", 500.0)
    # others keep beating while h:1 is silent: it is forgotten
    m.heard(_hb("h:3"), 20.0)
    assert not m.is_member("h:1", 20.0) and m.is_member("h:3", 20.0)
    m.heard(_hb("h:3", state=control_pb2.STATE_DEAD), 21.0)
    assert m.endpoints() == []


async def test_decode_members_wait_for_a_late_heartbeat():
    import asyncio
    m = DecodeMembers()
    assert not await m.wait_member("h:1", 0.05)

    async def later():
        await asyncio.sleep(0.05)
        m.heard(_hb("h:1"), m.clock())

    task = asyncio.create_task(later())
    assert await m.wait_member("h:1", 2.0)
    await task


def test_cli_certs_k8s_names_each_nats_pod(tmp_path, capsys):
    import yaml
    assert cli_main(["certs", "--out", str(tmp_path), "--k8s", "--namespace", "ml",
                     "--nats-nodes", "5"]) == 0
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(capsys.readouterr().out) if d}
    _, sans = _sans(base64.b64decode(docs["epserve-tls-nats"]["data"]["tls.crt"]))
    names = set(sans.get_values_for_type(x509.DNSName))
    assert {f"epserve-nats-{i}.epserve-nats-headless" for i in range(5)} <= names
    assert "epserve-nats-4.epserve-nats-headless.ml" in names and "epserve-nats" in names
    assert "epserve-nats-5.epserve-nats-headless" not in names
    _, sans = _sans(base64.b64decode(docs["epserve-tls-decode"]["data"]["tls.crt"]))
    assert not any("nats" in n for n in sans.get_values_for_type(x509.DNSName))


def test_nats_auth_command_prints_the_config_lines(capsys):
    from services.local.nats_auth import main
    assert main(["/etc/nats-tls"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == render_tls("/etc/nats-tls", indent=2)
    assert printed[1] == '  cert_file: "/etc/nats-tls/tls.crt"'
    # the same users either way (local servers get them on one line)
    assert "".join(render_tls("/x", indent=2)).replace(" ", "") == "".join(
        render_tls("/x")).replace(" ", "")
