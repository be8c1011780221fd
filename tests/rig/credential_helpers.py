"""Docker credential helpers as peers: Debian's ``docker-credential-pass`` over a
keyring made for the test, and small helper scripts that answer as a test needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

KEY_USER = "blockstore-test@example.invalid"


class PassKeyring:
    """A ``pass`` store under ``root`` with its own GnuPG key (no passphrase), for the
    real ``docker-credential-pass`` to keep logins in; ``env`` finds it.

    The GnuPG home is a short directory of its own under the system's temporary
    directory: gpg-agent puts its sockets there, and under a test's ``tmp_path`` their
    paths passed the 107 bytes a Unix socket's may have once pytest's run numbers
    reached four digits, and the agent did not start."""

    def __init__(self, root: Path):
        self.env = {
            "GNUPGHOME": tempfile.mkdtemp(prefix="gpg-"),  # made 0700
            "PASSWORD_STORE_DIR": str(root / "store"),
        }
        try:
            self._run("gpg", "--batch", "--passphrase", "", "--quick-gen-key", KEY_USER)
            self._run("pass", "init", KEY_USER)
        except BaseException:
            self.close()
            raise

    def store(self, server_url: str, username: str, secret: str) -> None:
        """Keep a login as ``docker login`` has the helper keep it."""
        login = {"ServerURL": server_url, "Username": username, "Secret": secret}
        self._run("docker-credential-pass", "store", stdin=json.dumps(login))

    def close(self) -> None:
        """Stop the gpg-agent the key and the helper started for this keyring, and
        remove its GnuPG home."""
        try:
            self._run("gpgconf", "--kill", "gpg-agent")
        finally:
            shutil.rmtree(self.env["GNUPGHOME"], ignore_errors=True)

    def _run(self, *command: str, stdin: str = "") -> None:
        done = subprocess.run(
            command,
            input=stdin,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:  # what gpg or pass said, which the exit status does not
            raise RuntimeError(
                f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()}"
            )


def why_pass_cannot_run() -> str | None:
    for program in ("docker-credential-pass", "pass", "gpg", "gpgconf"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def helper_script(directory: Path, name: str, body: str) -> Path:
    """``docker-credential-NAME`` in ``directory``: a shell script running ``body``, which
    finds the server URL written on its stdin in ``$server``, to the last byte."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / f"docker-credential-{name}"
    read_stdin = 'server=$(cat; echo .)\nserver="${server%.}"'
    script.write_text(f'#!/bin/sh\n[ "$1" = get ] || exit 3\n{read_stdin}\n{body}\n')
    script.chmod(0o755)
    return script


def docker_config_with(directory: Path, config: dict) -> Path:
    """``config.json`` in ``directory`` (for ``DOCKER_CONFIG``) holding ``config``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path
