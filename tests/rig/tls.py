"""A certificate authority made for one test run, with ``openssl``.

It signs the HTTPS registry's server certificate (for 127.0.0.1 and
localhost) and the token issuer's signing certificate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path
    cert: Path
    key: Path

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        """A certificate and key signed by this CA; ``server`` adds the loopback names."""
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        extensions = self.directory / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE"]
        if server:
            lines += [
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "extendedKeyUsage=serverAuth",
                "keyUsage=digitalSignature,keyEncipherment",
            ]
        else:
            lines.append("keyUsage=digitalSignature")
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            f"/CN={name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            self.cert,
            "-CAkey",
            self.key,
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            extensions,
            "-out",
            cert,
        )
        return cert, key


def make_ca(directory: Path) -> CertificateAuthority:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        "/CN=blockstore test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return CertificateAuthority(directory, cert, key)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
