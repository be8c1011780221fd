"""Asking a docker credential helper for a registry's login, as docker and podman ask.

``docker-credential-NAME get``, found on PATH, is given the registry's address on its
stdin and answers ``{"ServerURL": ..., "Username": ..., "Secret": ...}``. It keeps no
login for the registry where it exits non-zero saying ``credentials not found in native
keychain`` (the protocol's reply), or answers an empty user name and secret (as
Debian's ``docker-credential-pass`` does). A helper that cannot be run, does not answer
in time (it is then killed, with whatever it started), fails, or answers no JSON login
raises ``CredentialHelperError``; the secret is never put in a message or a log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blockstore.errors import CredentialHelperError

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 20.0
"""Seconds a helper may take: a cloud helper asks its provider for a token, which takes
a second or two; one waiting on a prompt no one sees would hold the command forever."""

NOT_FOUND = "credentials not found in native keychain"
IDENTITY_TOKEN_USER = "<token>"
"""The user name with which a helper says its Secret is an identity token."""
MESSAGE_LIMIT = 200
"""Characters of a failing helper's message that are quoted."""
WITHHELD = ("BLOCKSTORE_PASSWORD",)
"""Variables of this process a helper is not given: a password the user gave for one
registry is no business of a program asked for another's login (a mirror's, say)."""


@dataclass(frozen=True)
class HelperLogin:
    """What a helper keeps for a registry: a user name and secret, or (user name
    ``<token>``) an identity token."""

    username: str
    secret: str

    @property
    def is_identity_token(self) -> bool:
        return self.username == IDENTITY_TOKEN_USER

    def __repr__(self) -> str:
        return f"HelperLogin(username={self.username!r}, secret=***)"


def ask_helper(name: str, address: str, config: Path) -> HelperLogin | None:
    """The login ``docker-credential-NAME`` keeps for the registry at ``address``, or
    None where it keeps none. ``config``: the auth file naming the helper, for errors."""
    program = f"docker-credential-{name}"
    executable = shutil.which(program)
    if executable is None:
        raise CredentialHelperError(
            f"the credential helper {program} (named in {config} for {address}) is not on "
            f"PATH: install it, or take it out of {config}"
        )
    log.debug("asking %s for the login for %s", program, address)
    returncode, stdout, stderr = _run(program, executable, address)
    if returncode != 0:
        if stdout.strip() == NOT_FOUND:
            return None
        said = _quoted(stderr.strip() or stdout)
        raise CredentialHelperError(f"{program} get failed ({_how_it_ended(returncode)}): {said}")
    return _login_in(program, stdout)


def _run(program: str, executable: str, address: str) -> tuple[int, str, str]:
    """Run ``executable get`` with ``address`` on its stdin, in a session of its own, so
    that on timeout it is killed with everything it started (which may hold its output
    open)."""
    try:
        process = subprocess.Popen(
            [executable, "get"],
            env={name: value for name, value in os.environ.items() if name not in WITHHELD},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise CredentialHelperError(f"{program} could not be run: {exc.strerror}") from None
    with process:
        try:
            stdout, stderr = process.communicate(address.encode(), timeout=HELPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise CredentialHelperError(
                f"{program} did not answer in {HELPER_TIMEOUT:g} s: it was stopped "
                "(is it waiting for a keychain to be unlocked?)"
            ) from None
    return (
        process.returncode,
        stdout.decode(errors="replace"),
        stderr.decode(errors="replace"),
    )


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def _quoted(message: str) -> str:
    """A helper's message on one line, trimmed to ``MESSAGE_LIMIT`` characters."""
    line = " ".join(message.split()) or "it said nothing"
    return line if len(line) <= MESSAGE_LIMIT else line[:MESSAGE_LIMIT] + "..."


def _login_in(program: str, reply: str) -> HelperLogin | None:
    """The login in a helper's reply; None for an empty one (no login kept)."""
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = None
    username = answer.get("Username") if isinstance(answer, dict) else None
    secret = answer.get("Secret") if isinstance(answer, dict) else None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise CredentialHelperError(
            f"{program} answered no login: not a JSON object with Username and Secret strings"
        )
    if not username and not secret:
        return None
    return HelperLogin(username, secret)
