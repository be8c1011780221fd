"""Certificate directories for NBD over TLS, in the layout nbdkit, libnbd and qemu read.

A server directory holds ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem``; a client directory holds ``ca-cert.pem`` and, when the
client has an identity, ``client-cert.pem`` and ``client-key.pem``. Every
certificate is made for the run with ``openssl``; the expired one is signed
with ``openssl ca``, the one tool of OpenSSL 3.0 that can back-date.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rig.tls import NEW_KEY, CertificateAuthority, make_ca

_CA_CONFIG = """\
[ca]
default_ca = issuer
[issuer]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class NBDCertificates:
    """Directories for one run: a server, its clients, and the ones that must fail."""

    server: Path  # signed by the run's CA
    expired_server: Path  # signed by the CA, valid only in 2020
    client: Path  # trusts the CA, has a certificate from it
    anonymous_client: Path  # trusts the CA, has no certificate
    stranger_client: Path  # trusts only another CA, has a certificate from it
    impostor_client: Path  # trusts the CA, has a certificate from another CA


def make_nbd_certificates(root: Path) -> NBDCertificates:
    ca = make_ca(root / "ca")
    other = make_ca(root / "other-ca")
    server = _directory(root / "server", ca.cert, "server", ca.issue("nbd-server", server=True))
    expired = _directory(
        root / "expired-server", ca.cert, "server", _expired_server_certificate(ca)
    )
    client = _directory(root / "client", ca.cert, "client", ca.issue("nbd-client", server=False))
    anonymous = _directory(root / "anonymous-client", ca.cert, None, None)
    stranger = _directory(
        root / "stranger-client", other.cert, "client", other.issue("stranger", server=False)
    )
    impostor = _directory(
        root / "impostor-client", ca.cert, "client", other.issue("impostor", server=False)
    )
    return NBDCertificates(server, expired, client, anonymous, stranger, impostor)


def _directory(
    path: Path, ca_cert: Path, role: str | None, identity: tuple[Path, Path] | None
) -> Path:
    path.mkdir(parents=True)
    shutil.copy(ca_cert, path / "ca-cert.pem")
    if role is not None and identity is not None:
        cert, key = identity
        shutil.copy(cert, path / f"{role}-cert.pem")
        shutil.copy(key, path / f"{role}-key.pem")
        (path / f"{role}-key.pem").chmod(0o600)
    return path


def _expired_server_certificate(ca: CertificateAuthority) -> tuple[Path, Path]:
    """A loopback server certificate whose validity ended long ago."""
    work = ca.directory / "expired"
    work.mkdir()
    (work / "index.txt").write_text("")
    (work / "serial").write_text("1000\n")
    config = work / "ca.cnf"
    config.write_text(_CA_CONFIG.format(dir=work))
    extensions = work / "server.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
    )
    key, csr, cert = work / "server.key", work / "server.csr", work / "server.crt"
    _openssl("req", "-new", *NEW_KEY, "-subj", "/CN=expired", "-keyout", key, "-out", csr)
    _openssl(
        *["ca", "-batch", "-notext", "-config", config, "-cert", ca.cert, "-keyfile", ca.key],
        *["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"],
        *["-extfile", extensions, "-in", csr, "-out", cert],
    )
    return cert, key


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
