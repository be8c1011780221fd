"""How to reach registries: the settings a user gives once for every request."""

from __future__ import annotations

from dataclasses import dataclass, field

from blockstore.errors import UsageError
from blockstore.registry.reference import is_port


@dataclass
class RegistryOptions:
    """Transport, credential and retry settings shared by every registry client.

    ``username``/``password`` are for the registry named in the image
    reference only; mirrors get credentials from config files keyed by their
    own host, so a credential never travels to a host it was not meant for.
    """

    insecure: bool = False
    """Plain HTTP instead of HTTPS (a registry on a trusted network)."""
    ca_file: str | None = None
    """A PEM bundle to verify the registry's certificate with (default: system CAs)."""
    username: str | None = None
    password: str | None = None
    mirrors: list[str] = field(default_factory=list)
    """``host[:port]`` (or ``http://``/``https://`` URLs) tried in order before the upstream;
    never with ``user:password@`` (see ``check_mirror``)."""
    timeout: float = 30.0
    """Seconds one read (a byte range, a manifest) may take in all: every attempt, wait
    and receive of it included. A read still unanswered then fails (EIO). One connect
    or receive waits at most a third of it, leaving time for another attempt; an
    upload has no overall limit, and this is its per-receive timeout."""
    max_attempts: int = 5
    """Tries of one read on no reply, 5xx, 429 and bodies cut short, within ``timeout``."""

    def __post_init__(self) -> None:
        for mirror in self.mirrors:
            check_mirror(mirror)

    def __repr__(self) -> str:
        # Dataclass repr would print the password into any log line or traceback.
        password = "***" if self.password else None
        return (
            f"RegistryOptions(insecure={self.insecure}, ca_file={self.ca_file!r}, "
            f"username={self.username!r}, password={password}, mirrors={self.mirrors!r}, "
            f"timeout={self.timeout}, max_attempts={self.max_attempts})"
        )


def check_mirror(mirror: str) -> None:
    """Refuse a mirror written with ``user:password@``, or whose host or port is not one.

    A mirror's name is shown in warnings and reprs, and ``mount`` puts it on
    the command line of the server it starts, which ``ps`` shows to every
    user: a password in it would leak. The message names the host only.
    """
    authority = mirror.split("://", 1)[-1].split("/", 1)[0]
    _, at, host = authority.rpartition("@")
    if at:
        raise UsageError(
            f"mirror {host}: a mirror's address cannot carry a user name or password; "
            f"credentials for a mirror come from the auth files (podman login, docker login) "
            f"keyed by its host, {host}"
        )
    # No name a resolver could judge: no host, or one with blanks in it.
    why = "no host" if not host or any(c.isspace() for c in host) else port_problem(host)
    if why:
        raise UsageError(f"mirror {mirror!r}: {why} (expected HOST[:PORT])")


def port_problem(authority: str) -> str | None:
    """Why the port of ``host[:port]`` (or ``[v6]:port``) is not one, or None. Only the
    port: a mirror's host may be a name a reference's could not be (``registry_mirror``,
    as container networks name hosts), and the resolver judges it."""
    if authority.startswith("["):
        _, _, rest = authority.partition("]")
        if not rest:
            return None
        if not rest.startswith(":"):
            return f"bad host {authority!r}"
        port = rest[1:]
    else:
        _, colon, port = authority.rpartition(":")
        if not colon:
            return None
    if not is_port(port):
        return f"port {port!r} is not a number in 1..65535"
    return None
