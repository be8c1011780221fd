"""``blockstore serve``: an image's layers as read-only NBD exports, in the foreground.

It prints one ``export NAME URI`` line per export (``""`` is the default
export, the top layer), then ``ready`` once it listens, so a script can wait
for it; ``blockstore mount`` is told the same on a pipe (``--ready-fd``,
see ``nbdfront.mount.readiness``), never from this output. SIGTERM and
SIGINT stop it cleanly:
replies in flight are sent, sockets closed, the cache closed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from blockstore.cli.common import (
    add_cache_options,
    add_image_options,
    add_prefetch_options,
    add_registry_options,
    add_tar_index_options,
    cache_opened_first,
    check_image_arguments,
    check_prefetch_options,
    check_registry_arguments,
    check_tar_index_options,
    keep_traces,
    open_image_from_args,
    parse_listen,
    parse_metrics_address,
    parse_timeout,
    prefetch_settings_from,
    read_trace_file,
    write_whole,
)
from blockstore.cli.tls_options import add_tls_options, exposure_warnings, server_tls_from
from blockstore.errors import BlockstoreError
from blockstore.heap import give_back_freed_memory
from blockstore.metrics import MetricsServer
from blockstore.wholefile import read_plain_file
from nbdfront.mount.readiness import ReadinessPipe
from nbdfront.server import DEFAULT_PORT, NBDServer, is_wildcard, netloc
from nbdfront.socketpath import overlong_socket_path
from nbdfront.tls import dates_warning

if TYPE_CHECKING:
    from blockstore.image import OpenImage
    from blockstore.prefetch.trace import Trace
    from nbdfront.tls import ServerTLS

log = logging.getLogger(__name__)

# Each stops the server as SIGTERM does, in-flight replies drained: SIGHUP is what a
# closed terminal sends a server started from it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve an image's layers over NBD (foreground)",
        description="Serve each layer of IMAGE as a read-only NBD export named layer<i>; "
        "the default export (empty name) is the only selected layer, else the top one.",
    )
    add_image_options(serve, "serve")
    add_tar_index_options(serve, mount_options=False)
    add_registry_options(serve)
    add_cache_options(serve)
    add_prefetch_options(serve)
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=parse_listen,
        default=None,
        help=f"TCP address to listen on (default 127.0.0.1:{DEFAULT_PORT}, "
        "or none when --unix is given; port 0 picks a free one)",
    )
    serve.add_argument(
        "--unix", type=_socket_path, metavar="PATH", help="listen on this Unix socket"
    )
    serve.add_argument("--pidfile", type=Path, metavar="FILE", help="write the process id here")
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=parse_metrics_address,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 picks a free "
        "one, printed before the exports)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=parse_timeout,
        default=None,
        metavar="SECONDS",
        help="close a connection that has chosen its export, then sent nothing and waited "
        "for nothing this long, or taken none of its replies this long (default: never, "
        "as a mounted disk may idle for hours)",
    )
    add_tls_options(serve)
    # The write end of a pipe from `blockstore mount`, told "ready" or the error on it.
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=run_serve)


def _socket_path(text: str) -> str:
    """A socket's path: an empty one would be bound in Linux's abstract namespace under a
    name the kernel picks, which no client could be told; one too long is said with its
    limit before anything is opened."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path is no socket (try /tmp/blockstore.sock)")
    if (why := overlong_socket_path(text)) is not None:
        raise argparse.ArgumentTypeError(f"{why}: give a shorter path (try /tmp/blockstore.sock)")
    return text


def run_serve(args: argparse.Namespace) -> int:
    if args.ready_fd is None:
        return _run_serve(args, None)
    with ReadinessPipe(args.ready_fd) as readiness:
        return _run_serve(args, readiness)


def _run_serve(args: argparse.Namespace, readiness: ReadinessPipe | None) -> int:
    tcp = args.listen
    if tcp is None and args.unix is None:
        tcp = ("127.0.0.1", DEFAULT_PORT)
    tls = server_tls_from(args)
    traces = read_trace_file(args.trace_file) if args.trace_file is not None else []
    check_image_arguments(args)
    check_registry_arguments(args)
    check_tar_index_options(args)
    check_prefetch_options(args)
    with cache_opened_first(args):
        return _serve(args, readiness, tcp, tls, traces)


def _serve(
    args: argparse.Namespace,
    readiness: ReadinessPipe | None,
    tcp: tuple[str, int] | None,
    tls: ServerTLS | None,
    traces: list[Trace],
) -> int:
    # The addresses are bound before the image opens, and after the arguments are
    # checked: one in use fails the command before it makes a cache, or fetches a byte
    # into one, but never hides a mistake in the arguments. Offline, the cache (which
    # it neither makes nor fills then) is opened first (``cache_opened_first``).
    server = NBDServer({}, tcp=tcp, unix=args.unix, tls=tls, idle_timeout=args.idle_timeout)
    image: OpenImage | None = None
    metrics = None
    pidfile: Path | None = None  # once written: another server's is never removed
    try:
        try:
            server.listen()
        except OSError as exc:
            said = _cannot_listen(exc, tcp, args.unix, tcp_bound=server.tcp_address is not None)
            raise BlockstoreError(said) from exc
        if args.metrics is not None:

            def stats() -> dict:  # none until the cache is open: a scrape then reads zeros
                return image.store.stats() if image is not None else {}

            metrics = start_metrics(args.metrics, stats, server)
        image = open_image_from_args(
            args,
            serves=True,
            tar_indexes=True,
            offline=args.offline,
            prefetch=prefetch_settings_from(args),
            replace_older=True,
        )
        keep_traces(image.store, traces)
        server.cancel_reads = image.cancel  # a read stuck on the registry ends at the cut
        blobs = image.exports(args.layer, args.blob)
        server.offer({blob.name: blob for blob in blobs}, blobs[-1].name)
        server.start()
        give_back_freed_memory()
        names = [blob.name for blob in blobs]
        reference = image.resolved.reference
        address = server.tcp_address
        for warning in exposure_warnings(address, tls, args.tls_verify_peer, reference, names):
            print(f"blockstore: {warning}", file=sys.stderr)
        if tls is not None and (dates := dates_warning(args.tls_certificates)):
            print(f"blockstore: warning: {dates}", file=sys.stderr)
        if metrics is not None:
            print(f"metrics {metrics_url(metrics)}")
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda *_: server.request_shutdown())
        if args.pidfile is not None:
            _write_pidfile(args.pidfile)
            pidfile = args.pidfile
        uris = {name: reachable(uri) for name, uri in server.uris().items()}
        for name, uri in uris.items():
            print(f"export {name} {uri}")
        print(f'export "" {reachable(server.uri(""))}')
        print("ready", flush=True)
        if readiness is not None:
            said = metrics_url(metrics) if metrics is not None else None
            readiness.ready({**uris, "": reachable(server.uri(""))}, metrics=said)
        log.info("serving %s (%s)", image.resolved.reference, ", ".join(b.name for b in blobs))
        server.serve_forever()
        # Stopping is done and was bounded: later signals change nothing, and one that
        # lands while the interpreter tears down (which restores default handlers, not
        # ignored ones) would end the process with the signal's status instead of 0.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return 0
    finally:
        server.shutdown()  # done already, once it served; else its listeners and socket
        if metrics is not None:
            metrics.stop()
        if image is not None:
            image.close()
        if pidfile is not None:
            _remove_pidfile(pidfile)


def _cannot_listen(
    exc: OSError, tcp: tuple[str, int] | None, unix: str | None, *, tcp_bound: bool
) -> str:
    """Why the server could not listen, and, where the address is taken (by another
    server, another user's on a shared machine), how to give another. The TCP address is
    bound first: once it is (``tcp_bound``), the failure is the Unix socket's."""
    if tcp is not None and not tcp_bound:
        where, other = f"{tcp[0]}:{tcp[1]}", "--listen HOST:PORT (port 0 picks a free one)"
    else:
        where, other = unix, "--unix PATH"
    return _bind_failure(exc, f"listen on {where}", other)


def _bind_failure(exc: OSError, what: str, other: str) -> str:
    """``cannot WHAT: why``, and where the address is taken, the option ``other`` that
    gives another."""
    said = f"cannot {what}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        said += f"; another server listens there: give another {other}"
    return said


def start_metrics(
    address: tuple[str, int], stats: Callable[[], dict], server: NBDServer
) -> MetricsServer:
    """Prometheus metrics of the cache (``stats``) and this server, announced before
    ``ready``."""
    try:
        metrics = MetricsServer(*address, stats, lambda: server.connection_count)
    except OSError as exc:
        where = f"{address[0]}:{address[1]}"
        raise BlockstoreError(
            _bind_failure(exc, f"serve metrics on {where}", "--metrics HOST:PORT")
        ) from exc
    return metrics


def metrics_url(metrics: MetricsServer) -> str:
    """Where ``metrics`` answers, as a client can use it (the port picked for port 0)."""
    host, port = metrics.address
    return reachable(f"http://{netloc(host, port)}/metrics")


def reachable(uri: str) -> str:
    """``uri`` as a client anywhere can use it: a wildcard host (``--listen 0.0.0.0:PORT``,
    ``[::]``) replaced by this machine's name, which clients here and on the network can
    use; a relative socket path (``--unix s.sock``) made absolute, so a client in another
    directory finds it."""
    parts = urllib.parse.urlsplit(uri)
    if parts.hostname is not None and is_wildcard(parts.hostname):
        parts = parts._replace(netloc=netloc(socket.gethostname(), parts.port))
        uri = urllib.parse.urlunsplit(parts)
    if not parts.query:
        return uri
    query = [
        (key, os.path.abspath(value) if key == "socket" else value)
        for key, value in urllib.parse.parse_qsl(parts.query)
    ]
    # Joined by hand: urlunsplit drops the empty host of nbd+unix:///NAME.
    return f"{uri.partition('?')[0]}?{urllib.parse.urlencode(query, quote_via=_quote_path)}"


def _quote_path(text: str, safe: str, encoding: str | None, errors: str | None) -> str:
    """A query value quoted as the server quotes a socket path (slashes kept)."""
    return urllib.parse.quote(text, safe="/", encoding=encoding, errors=errors)


def _remove_pidfile(path: Path) -> None:
    """Remove the pidfile this server wrote, if it still names this server: another
    server given the same pidfile since names itself there, and keeps it; so does a
    link, FIFO or device another user put in its place."""
    with contextlib.suppress(OSError, ValueError):
        if int(read_plain_file(path, 64)) == os.getpid():
            path.unlink()


def _write_pidfile(path: Path) -> None:
    """Written whole or not at all, so a reader never sees a partial number."""
    write_whole(path, f"{os.getpid()}\n".encode(), suffix=".tmp")
