"""The TLS options of the commands that run an NBD server, and what a listener exposes.

The spellings are nbdkit's (``--tls``, ``--tls-certificates``,
``--tls-verify-peer``), so habits and certificate directories carry over.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blockstore.errors import UsageError
from nbdfront.protocol import TLSPolicy

if TYPE_CHECKING:
    from nbdfront.tls import ServerTLS


def add_tls_options(parser: argparse.ArgumentParser, *, offer_verify_peer: bool = True) -> None:
    """The TLS options; ``offer_verify_peer`` False keeps ``--tls-verify-peer`` out of the
    help of a command that refuses it (``mount``), while it is still parsed, so that one
    typed from nbdkit habit is told why, not called unknown."""
    parser.add_argument(
        "--tls",
        choices=[policy.value for policy in TLSPolicy],
        default=TLSPolicy.OFF.value,
        help="off: plain NBD; on: clients may upgrade with STARTTLS; require: only TLS "
        "clients get anything (default off)",
    )
    parser.add_argument(
        "--tls-certificates",
        metavar="DIR",
        type=Path,
        help="directory with server-cert.pem, server-key.pem and, to check clients, "
        "ca-cert.pem (nbdkit's layout)",
    )
    parser.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="require a client certificate signed by DIR/ca-cert.pem"
        if offer_verify_peer
        else argparse.SUPPRESS,
    )


def server_tls_from(args: argparse.Namespace) -> ServerTLS | None:
    """The server's TLS set-up from the options, or None for plain NBD; checked before serving."""
    policy = TLSPolicy(args.tls)
    if policy is TLSPolicy.OFF:
        if args.tls_certificates is not None or args.tls_verify_peer:
            raise UsageError("--tls-certificates and --tls-verify-peer need --tls on or require")
        return None
    if args.tls_certificates is None:
        raise UsageError(f"--tls {policy.value} needs --tls-certificates DIR")
    if not args.tls_certificates.is_dir():
        raise UsageError(f"--tls-certificates {args.tls_certificates}: no such directory")
    # Here, not at the top: mount and umount import this module and stay light.
    from nbdfront.tls import ServerTLS, TLSSetupError, server_context

    try:
        context = server_context(args.tls_certificates, args.tls_verify_peer)
    except TLSSetupError as exc:
        # A file of the directory named that is missing or cannot be used: bad usage, as a
        # directory that does not exist is.
        raise UsageError(f"TLS: {exc}") from None
    return ServerTLS(policy, context)


def mount_tls_arguments(args: argparse.Namespace) -> list[str]:
    """For ``mount``: the TLS options of its server, checked before anything starts.

    The mount's own client is nbdfuse, which (run as root, as mounting is)
    takes certificates only from the system-wide ``/etc/pki/libnbd``: it can
    show no client certificate of its own, so ``--tls-verify-peer`` would
    lock it out and is refused here.
    """
    if args.tls_verify_peer:
        raise UsageError(
            "mount cannot use --tls-verify-peer: its own client (nbdfuse) has no way to "
            "present a client certificate"
        )
    if server_tls_from(args) is None:
        return []
    return ["--tls", args.tls, "--tls-certificates", str(args.tls_certificates.resolve())]


def _listener(host: str, port: int) -> tuple[str, str]:
    """How a warning names a listener, and what those who can read from it reach: a
    wildcard (``0.0.0.0``, ``::``) is every address of this machine, an address no
    client could be told to connect to."""
    from nbdfront.server import is_wildcard, netloc

    if is_wildcard(host):
        return f"every address of this machine (port {port})", f"this machine's port {port}"
    return netloc(host, port), netloc(host, port)


def exposure_warnings(
    address: tuple[str, int] | None,
    tls: ServerTLS | None,
    verify_peer: bool,
    image: str,
    exports: Sequence[str],
) -> list[str]:
    """What a TCP listener beyond loopback hands to the network, said plainly.

    Nothing on loopback or a Unix socket: only this machine can connect.
    """
    from nbdfront.server import is_loopback

    if address is None or is_loopback(address[0]):
        return []
    where, reach = _listener(*address)
    names = f"{', '.join(exports)} of {image}"
    if tls is None:
        return [
            f"warning: listening on {where} without TLS: exports {names} can be read by "
            f"anyone who can reach {reach}, unencrypted and unauthenticated "
            "(--tls require --tls-certificates DIR protects them)"
        ]
    if tls.policy is TLSPolicy.ON:
        return [
            f"warning: --tls on still serves plain clients: exports {names} can be read by "
            f"anyone who can reach {reach} without TLS, unencrypted and unauthenticated "
            "(--tls require refuses them)"
        ]
    if not verify_peer:
        return [
            f"note: exports {names} are encrypted on {where}, but any TLS client that can "
            "reach it may read them (--tls-verify-peer admits only clients with a certificate "
            "from ca-cert.pem)"
        ]
    return []
