"""This process's mesh identity (mTLS): its key and certificate, the CA, and the credentials
built from them for gRPC servers, gRPC channels and NATS.

A service loads its identity from `--tls-dir DIR` (DIR/tls.crt, tls.key, ca.crt: a Kubernetes
TLS Secret's layout, what `epserve certs` writes) or `--tls-cert/--tls-key/--tls-ca`, and
installs it once, first thing in `Service.start` (`install`). Every channel the process dials
to a peer service then goes through `channels.dial`, which uses it: one process is one
service, so one identity per process is the whole truth, and the EP engine's channels need
no extra plumbing. No identity installed (tests that start services in-process, `epserve serve`
without TLS flags): plaintext, as before.

A client names the role it expects the server to have: gRPC's target-name override is set to
`<role>.role.epserve`, a DNS SAN only certificates of that role carry, so a prefill instance
told to push KV to a host whose certificate is not a decode's fails the handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.certs import CA_FILE, CERT_FILE, KEY_FILE, role_dns_name, role_of


class TLSConfigError(ValueError):
    """The TLS settings are incomplete, or the files do not make an identity."""


@dataclass(frozen=True)
class MeshTLS:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    role: str
    instance: str
    ca_path: str = ""
    cert_path: str = ""
    key_path: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, ca: str | Path) -> MeshTLS:
        try:
            cert_pem, key_pem, ca_pem = (Path(p).read_bytes() for p in (cert, key, ca))
        except OSError as exc:
            raise TLSConfigError(f"cannot read TLS files: {exc}") from exc
        who = role_of(cert_pem)
        if who is None:
            raise TLSConfigError(f"{cert} names no epserve role (no spiffe://epserve/<role>/... "
                                 f"URI SAN); make it with `epserve certs`")
        return cls(cert_pem, key_pem, ca_pem, who[0], who[1], str(ca), str(cert), str(key))

    @classmethod
    def from_dir(cls, directory: str | Path) -> MeshTLS:
        d = Path(directory)
        return cls.load(d / CERT_FILE, d / KEY_FILE, d / CA_FILE)

    # ---- gRPC -------------------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials:
        """A peer must present a certificate signed by the CA, or the handshake fails."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                           root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if "channel" not in self._cache:  # one object: channels made with it share a context
            self._cache["channel"] = grpc.ssl_channel_credentials(
                root_certificates=self.ca_pem, private_key=self.key_pem,
                certificate_chain=self.cert_pem)
        return self._cache["channel"]

    # ---- NATS -------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """A client context for NATS: verifies the server against the CA, presents our cert
        (nats-server maps it to this role's user and permissions)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem.decode())
        if not self.cert_path or not self.key_path:
            raise TLSConfigError("a NATS TLS context needs the certificate and key as files")
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def role_target_options(role: str) -> tuple[tuple[str, str], ...]:
    """Channel options making the handshake check that the server's certificate is `role`'s."""
    return (("grpc.ssl_target_name_override", role_dns_name(role)),)


def check_settings(tls_dir: str = "", cert: str = "", key: str = "", ca: str = "") -> None:
    """Raises TLSConfigError when the flags do not name one identity (files are read later,
    at start: a config is also built where they are not, e.g. checking a manifest)."""
    if tls_dir and (cert or key or ca):
        raise TLSConfigError("give --tls-dir or --tls-cert/--tls-key/--tls-ca, not both")
    if not tls_dir and (cert or key or ca) and not (cert and key and ca):
        raise TLSConfigError("--tls-cert, --tls-key and --tls-ca go together")


def from_settings(tls_dir: str = "", cert: str = "", key: str = "", ca: str = "") -> MeshTLS | None:
    """The identity the flags name, or None when none is given."""
    check_settings(tls_dir, cert, key, ca)
    if tls_dir:
        return MeshTLS.from_dir(tls_dir)
    return MeshTLS.load(cert, key, ca) if cert else None


def nats_tls_options(tls_dir: str) -> dict:
    """nats.connect keyword arguments for a CLI run with `--tls-dir` (an operator identity,
    `epserve certs`): `{}` without one."""
    return {"tls": MeshTLS.from_dir(tls_dir).ssl_context()} if tls_dir else {}


TLS_DIR_ENV = "EPSERVE_TLS_DIR"  # the CLI's --tls-dir default (what `serve` reads too)
TLS_DIR_HELP = ("mesh identity (tls.crt, tls.key, ca.crt; `epserve certs` makes one, role "
                "operator) for a NATS with TLS [env EPSERVE_TLS_DIR]")

_installed: MeshTLS | None = None


def install(identity: MeshTLS | None) -> None:
    """This process's identity from now on (None: plaintext)."""
    global _installed
    _installed = identity


def current() -> MeshTLS | None:
    return _installed
