"""The mesh's certificates: one CA, and a key + certificate per service instance (pure-ish).

Who a peer is lives in its certificate, in three places that always agree:
- the URI SAN `spiffe://epserve/<role>/<instance>`: what authorization reads (`role_of`);
- the subject: CN = instance, OU = role (for humans, `openssl x509 -subject`);
- the DNS SAN `<role>.role.epserve`: a client dialling a decode instance expects that name
  (gRPC's target-name override), so the TLS handshake itself checks the server's role.
Plus `localhost`, 127.0.0.1 and any extra DNS names / IPs (the Kubernetes service names).

Keys are ECDSA P-256: a whole local cluster's set is made in milliseconds.
A directory per identity holds `tls.crt`, `tls.key` and `ca.crt` (the names of a Kubernetes
TLS Secret), so `--tls-dir` reads the same layout locally and from a mounted Secret.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_PREFIX = "spiffe://epserve/"
ROLE_DNS_SUFFIX = ".role.epserve"
ORGANIZATION = "epserve"
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"
CA_KEY_FILE = "ca.key"
# Roles that hold a certificate: the six services, NATS (server side of the control plane)
# and `operator` (the CLI and tests: health, reflection, NATS admin; no data-plane RPC).
CERT_ROLES = ("router", "scheduler", "prefill", "decode", "expert-worker", "ledger", "nats",
              "operator")


def role_dns_name(role: str) -> str:
    """The DNS SAN naming a role: what a client expects when it dials that role."""
    return f"{role}{ROLE_DNS_SUFFIX}"


def spiffe_id(role: str, instance: str) -> str:
    return f"{SPIFFE_PREFIX}{role}/{instance}"


@dataclass(frozen=True)
class Issued:
    """One PEM-encoded key and certificate."""

    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little: a peer whose clock runs slightly behind still accepts it.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(days: int = 3650, name: str = "epserve mesh CA") -> Issued:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity(days)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Issued, role: str, instance: str, dns_names: tuple[str, ...] = (),
          ips: tuple[str, ...] = (), days: int = 825) -> Issued:
    """A certificate for `instance` of `role`, usable as a TLS server and client."""
    if role not in CERT_ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(CERT_ROLES)}")
    if not instance or "/" in instance:
        raise ValueError(f"instance must be a non-empty name without '/', got {instance!r}")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _key()
    names = dict.fromkeys((role_dns_name(role), "localhost", *dns_names))  # ordered, unique
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(role, instance))]
    sans += [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(("127.0.0.1", *ips))]
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, instance)])
    start, end = _validity(days)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def role_of(cert_pem: bytes) -> tuple[str, str] | None:
    """(role, instance) from a certificate's spiffe://epserve/<role>/<instance> URI SAN;
    None when it has none (not one of ours)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return None
    for uri in uris:
        if uri.startswith(SPIFFE_PREFIX):
            role, _, instance = uri[len(SPIFFE_PREFIX):].partition("/")
            if role and instance:
                return role, instance
    return None


# ---- files --------------------------------------------------------------------------------

def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_or_make_ca(out: Path, days: int = 3650) -> Issued:
    """The CA in `out` (ca.crt + ca.key), made first when absent: adding identities later
    reuses it, so certificates already handed out stay valid."""
    cert, key = out / CA_FILE, out / CA_KEY_FILE
    if cert.is_file() and key.is_file():
        return Issued(cert.read_bytes(), key.read_bytes())
    ca = make_ca(days)
    _write(cert, ca.cert_pem)
    _write(key, ca.key_pem, private=True)
    return ca


def write_identity(out: Path, name: str, ca: Issued, issued: Issued) -> Path:
    """`out/<name>/{tls.crt,tls.key,ca.crt}`; the directory (a service's --tls-dir)."""
    d = out / name
    _write(d / CERT_FILE, issued.cert_pem)
    _write(d / KEY_FILE, issued.key_pem, private=True)
    _write(d / CA_FILE, ca.cert_pem)
    return d


@dataclass(frozen=True)
class Identity:
    """One identity to issue: directory name, role, instance, extra SANs."""

    name: str
    role: str
    instance: str
    dns_names: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


def make_certs(out: str | Path, identities: list[Identity], days: int = 825) -> dict[str, Path]:
    """The CA (kept when present) and every identity's directory; name -> its --tls-dir."""
    out = Path(out)
    ca = load_or_make_ca(out)
    return {i.name: write_identity(out, i.name, ca, issue(ca, i.role, i.instance, i.dns_names,
                                                          i.ips, days))
            for i in identities}
