"""A certificate authority made for one test run, with ``openssl``.

It signs the HTTPS registry's server certificate (for 127.0.0.1 and
localhost) and the token issuer's signing certificate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

NEW_KEY = ["-newkey", "rsa:2048", "-nodes", "-days", "2"]


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path
    cert: Path
    key: Path

    def issue(
        self, name: str, *, server: bool, names: str = "IP:127.0.0.1,DNS:localhost"
    ) -> tuple[Path, Path]:
        """A certificate and key signed by this CA; ``server`` adds ``names`` (by default
        the loopback ones)."""
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        extensions = self.directory / f"{name}.ext"
        usage = (
            f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n"
            "keyUsage=digitalSignature,keyEncipherment"
            if server
            else "keyUsage=digitalSignature"
        )
        extensions.write_text(f"basicConstraints=CA:FALSE\n{usage}\n")
        _openssl("req", "-new", *NEW_KEY, "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
        _openssl(
            *["x509", "-req", "-days", "2", "-sha256", "-CAcreateserial"],
            *("-CA", self.cert, "-CAkey", self.key),
            *("-in", csr, "-extfile", extensions, "-out", cert),
        )
        return cert, key


def make_ca(directory: Path) -> CertificateAuthority:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        "req", "-x509", *NEW_KEY, "-subj", "/CN=blockstore test CA", "-keyout", key, "-out", cert,
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )  # fmt: skip
    return CertificateAuthority(directory, cert, key)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
