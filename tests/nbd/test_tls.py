"""NBD over TLS with real clients: libnbd (nbdinfo, nbdcopy) and qemu-img over nbds://.

Certificates are made for the run with openssl (``nbd_certificates``). The
clients check the server's certificate and name; with ``--tls-verify-peer``
the server checks theirs. A raw client plays the downgrade attacker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import nbd_wire as w
import pytest
from rig.waiting import wait_for
from test_serve_cli import serving, stop

from nbdfront.protocol import TLSPolicy
from nbdfront.server import NBDServer
from nbdfront.tls import ServerTLS, TLSSetupError, server_context

REP_ERR_TLS_REQD = 2**31 + 5


@pytest.fixture
def tls_server(local_blob, nbd_certificates) -> Iterator[Callable[..., str]]:
    """Factory: serve ``local_blob`` on loopback with a TLS policy; returns HOST:PORT."""
    servers: list[NBDServer] = []

    def start(policy: TLSPolicy, verify_peer: bool = False, certificates=None) -> str:
        context = server_context(certificates or nbd_certificates.server, verify_peer)
        server = NBDServer(
            {"blob": local_blob.blob},
            tcp=("127.0.0.1", 0),
            default_export="blob",
            tls=ServerTLS(policy, context),
        )
        server.start()
        servers.append(server)
        host, port = server.tcp_address
        return f"{host}:{port}"

    yield start
    for server in servers:
        server.shutdown()


def nbds(address: str, certificates, export: str = "blob") -> str:
    return f"nbds://{address}/{export}?tls-certificates={certificates}"


def run(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=60)


def qemu_img(
    command: str, address: str, certificates, *rest: object
) -> subprocess.CompletedProcess:
    """``qemu-img COMMAND`` on the export over TLS, with qemu's x509 credentials from a DIR."""
    host, port = address.split(":")
    return run(
        *["qemu-img", command, "--object"],
        f"tls-creds-x509,id=tls0,dir={certificates},endpoint=client",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
        "export=blob,tls-creds=tls0",
        *rest,
    )


def test_nbdcopy_and_nbdinfo_over_tls_with_client_certificates(
    tls_server, local_blob, nbd_certificates, tmp_path
):
    """--tls require --tls-verify-peer: nbdinfo sees TLS and the right size, and nbdcopy
    over nbds:// with a client certificate copies every byte right."""
    address = tls_server(TLSPolicy.REQUIRE, verify_peer=True)
    uri = nbds(address, nbd_certificates.client)
    info = run("nbdinfo", "--json", uri)
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)
    assert facts["TLS"] is True
    assert facts["exports"][0]["export-size"] == len(local_blob.data)
    copied = run("nbdcopy", uri, tmp_path / "copy")
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "copy").read_bytes() == local_blob.data


def test_qemu_img_over_tls(tls_server, local_blob, nbd_certificates, tmp_path):
    """qemu-img with tls-creds-x509 (endpoint=client) converts the export over TLS, client
    certificate checked by the server, and every byte matches (qemu pads the odd-sized
    export to whole sectors with zeros)."""
    address = tls_server(TLSPolicy.REQUIRE, verify_peer=True)
    out = tmp_path / "copy.raw"
    converted = qemu_img("convert", address, nbd_certificates.client, "-O", "raw", out)
    assert converted.returncode == 0, converted.stderr
    copy = out.read_bytes()
    assert copy[: len(local_blob.data)] == local_blob.data
    assert copy[len(local_blob.data) :] == bytes(len(copy) - len(local_blob.data))
    assert len(copy) - len(local_blob.data) < 512


def test_client_refuses_a_server_from_another_ca(tls_server, nbd_certificates):
    """A client that trusts only another CA refuses the server's certificate: libnbd and
    qemu both fail the connection and read nothing."""
    address = tls_server(TLSPolicy.REQUIRE)
    info = run("nbdinfo", nbds(address, nbd_certificates.stranger_client))
    assert info.returncode != 0 and "export-size" not in info.stdout
    assert "certificate" in info.stderr.lower()
    qemu = qemu_img("info", address, nbd_certificates.stranger_client)
    assert qemu.returncode != 0 and "virtual size" not in qemu.stdout
    assert "certificate" in qemu.stderr.lower()


def test_client_refuses_an_expired_server_certificate(tls_server, nbd_certificates):
    """A server certificate from the right CA, for the right name, that expired in 2020
    is refused by libnbd and by qemu (openssl confirms expiry is its only defect)."""
    ca, cert = (nbd_certificates.expired_server / n for n in ("ca-cert.pem", "server-cert.pem"))
    assert run("openssl", "verify", "-no_check_time", "-CAfile", ca, cert).returncode == 0
    assert "has expired" in run("openssl", "verify", "-CAfile", ca, cert).stderr
    address = tls_server(TLSPolicy.REQUIRE, certificates=nbd_certificates.expired_server)
    info = run("nbdinfo", nbds(address, nbd_certificates.client))
    assert info.returncode != 0 and "export-size" not in info.stdout
    assert "certificate verification" in info.stderr.lower()
    qemu = qemu_img("info", address, nbd_certificates.client)
    assert qemu.returncode != 0 and "virtual size" not in qemu.stdout
    assert "certificate" in qemu.stderr.lower(), qemu.stderr


@pytest.mark.parametrize("client", ["anonymous_client", "impostor_client"])
def test_server_refuses_clients_without_a_certificate_it_trusts(
    tls_server, nbd_certificates, client
):
    """With --tls-verify-peer a client with no certificate, or one from another CA, is
    dropped during the handshake: nbdinfo fails and learns nothing of the export."""
    address = tls_server(TLSPolicy.REQUIRE, verify_peer=True)
    info = run("nbdinfo", "--list", nbds(address, getattr(nbd_certificates, client)))
    assert info.returncode != 0
    assert "blob" not in info.stdout and "export-size" not in info.stdout


def test_plain_clients_are_served_with_tls_on_and_refused_with_require(
    tls_server, local_blob, nbd_certificates
):
    """--tls on serves both a plain nbd:// client and an nbds:// one; --tls require refuses
    the plain one."""
    on = tls_server(TLSPolicy.ON)
    for uri in (f"nbd://{on}/blob", nbds(on, nbd_certificates.client)):
        info = run("nbdinfo", "--size", uri)
        assert info.returncode == 0 and int(info.stdout) == len(local_blob.data), info.stderr
    required = tls_server(TLSPolicy.REQUIRE)
    info = run("nbdinfo", "--size", f"nbd://{required}/blob")
    assert info.returncode != 0 and info.stdout == ""


def _option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    header = _read_exactly(sock, 20)
    magic, option, reply, length = struct.unpack(">QIII", header)
    assert magic == w.OPT_REPLY_MAGIC
    return option, reply, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += piece
    return data


def test_downgrade_attempt_gets_nothing(tls_server, local_blob):
    """A client that skips STARTTLS against --tls require and asks for LIST, INFO, GO,
    structured replies and then EXPORT_NAME gets ERR_TLS_REQD to each, is hung up on
    after EXPORT_NAME, and never receives a size, a name or a byte of the export."""
    host, port = tls_server(TLSPolicy.REQUIRE).split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        greeting = _read_exactly(sock, 18)
        assert struct.unpack(">QQ", greeting[:16]) == (w.NBDMAGIC, w.IHAVEOPT)
        sock.sendall(w.client_flags())
        attempts = [
            (w.OPT_LIST, b""),
            (w.OPT_INFO, w.go_data("blob", (w.INFO_NAME, w.INFO_DESCRIPTION))),
            (w.OPT_GO, w.go_data("")),
            (w.OPT_STRUCTURED_REPLY, b""),
        ]
        for option, data in attempts:
            sock.sendall(w.option(option, data))
            answer = _option_reply(sock)
            assert answer[:2] == (option, REP_ERR_TLS_REQD)
            received += answer[2]
        sock.sendall(w.option(w.OPT_EXPORT_NAME, b"blob"))
        sock.sendall(w.request(w.CMD_READ, 1, 0, 4096))
        while piece := sock.recv(65536):
            received += piece
    assert b"blob" not in received and b"random bytes" not in received
    assert struct.pack(">Q", len(local_blob.data)) not in received
    assert local_blob.data[:4096] not in received and local_blob.data[:16] not in received


def test_plain_text_after_the_starttls_ack_gets_nothing(tls_server, local_blob):
    """A client that gets STARTTLS acknowledged and then carries on in plain text (GO)
    fails the handshake: the server hangs up, sending at most a TLS alert, never an
    option reply or a byte of the export."""
    host, port = tls_server(TLSPolicy.REQUIRE).split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        _read_exactly(sock, 18)
        sock.sendall(w.client_flags() + w.option(w.OPT_STARTTLS))
        assert _option_reply(sock)[:2] == (w.OPT_STARTTLS, w.REP_ACK)
        sock.sendall(w.option(w.OPT_GO, w.go_data("")))
        received = b""
        while piece := sock.recv(65536):
            received += piece
    assert received == b"" or received[0] == 0x15, received[:16]  # 0x15: a TLS alert record
    assert struct.pack(">Q", w.OPT_REPLY_MAGIC) not in received
    assert struct.pack(">Q", len(local_blob.data)) not in received


def _started_requiring_tls(local_blob, nbd_certificates) -> NBDServer:
    """A server of ``local_blob`` on loopback that requires TLS, started; the test's to
    shut down (the ``tls_server`` fixture hides the server, which these tests watch)."""
    server = NBDServer(
        {"blob": local_blob.blob},
        tcp=("127.0.0.1", 0),
        default_export="blob",
        tls=ServerTLS(TLSPolicy.REQUIRE, server_context(nbd_certificates.server)),
    )
    server.start()
    return server


def test_close_notify_ends_the_session_at_once(local_blob, nbd_certificates):
    """A TLS client that says goodbye (close_notify) in the middle of option haggling
    is let go at once: the server answers with its own close_notify and closes, and no
    connection is left behind."""
    server = _started_requiring_tls(local_blob, nbd_certificates)
    client_context = ssl.create_default_context(cafile=nbd_certificates.client / "ca-cert.pem")
    try:
        with socket.create_connection(server.tcp_address, timeout=10) as sock:
            _read_exactly(sock, 18)
            sock.sendall(w.client_flags() + w.option(w.OPT_STARTTLS))
            assert _option_reply(sock)[:2] == (w.OPT_STARTTLS, w.REP_ACK)
            tls = client_context.wrap_socket(sock, server_hostname="127.0.0.1")
            assert server.connection_count == 1
            tls.unwrap()  # sends close_notify, waits for the server's
        deadline = time.monotonic() + 5
        while server.connection_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connection_count == 0
    finally:
        server.shutdown()


def test_failed_tls_handshakes_by_the_dozen_are_logged_a_few_then_counted(
    local_blob, nbd_certificates, caplog
):
    """Forty clients each get STARTTLS acknowledged, then hang up or go on in plain
    text (a scanner, or clients of another TLS setup, retrying). The first ``BURST``
    failed handshakes are logged with their cause, the rest counted in one line at
    shutdown, as any connection that ends uncleanly is; a real client is still served
    over TLS. Before, each failed handshake was a warning of its own."""
    server = _started_requiring_tls(local_blob, nbd_certificates)
    try:
        for attempt in range(40):
            with socket.create_connection(server.tcp_address, timeout=10) as sock:
                _read_exactly(sock, 18)
                sock.sendall(w.client_flags() + w.option(w.OPT_STARTTLS))
                assert _option_reply(sock)[:2] == (w.OPT_STARTTLS, w.REP_ACK)
                if attempt % 2:
                    sock.sendall(w.option(w.OPT_GO, w.go_data("")))
        host, port = server.tcp_address
        size = run("nbdinfo", "--size", nbds(f"{host}:{port}", nbd_certificates.client))
        assert size.stdout.strip() == str(len(local_blob.data)), size.stderr
        assert wait_for(lambda: server.connection_count == 0)
    finally:
        server.shutdown()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    burst = server.hangups.BURST
    assert len(warned) == burst + 1, warned
    assert all("TLS handshake with" in line for line in warned[:burst])
    assert warned[-1].startswith(f"{40 - burst} more connections ended uncleanly")


def test_server_context_names_what_is_missing(nbd_certificates, tmp_path):
    """A certificate directory without the server's key, or without ca-cert.pem when
    peers are verified, is refused up front with the file named."""
    with pytest.raises(TLSSetupError, match=r"server-key\.pem"):
        server_context(nbd_certificates.client)
    (tmp_path / "server-cert.pem").write_bytes(
        (nbd_certificates.server / "server-cert.pem").read_bytes()
    )
    (tmp_path / "server-key.pem").write_bytes(
        (nbd_certificates.server / "server-key.pem").read_bytes()
    )
    server_context(tmp_path)
    with pytest.raises(TLSSetupError, match=r"ca-cert\.pem"):
        server_context(tmp_path, verify_peer=True)


def serve_args(pushed_images, tmp_path, *extra: str) -> list[str]:
    cache = str(tmp_path / "cache")
    return [pushed_images.small, "--insecure", "--cache-dir", cache, *extra]


def test_serve_command_over_tls_end_to_end(
    registry, pushed_images, erofs_images, nbd_certificates, tmp_path
):
    """``blockstore serve --tls require --tls-certificates DIR --tls-verify-peer`` announces
    nbds:// URIs, warns of nothing on loopback, and nbdcopy with a client certificate reads
    the image byte for byte; SIGTERM still ends it with 0."""
    tls = ["--tls", "require", "--tls-certificates", str(nbd_certificates.server)]
    args = serve_args(pushed_images, tmp_path, "--listen", "127.0.0.1:0", *tls)
    with serving(*args, "--tls-verify-peer") as (proc, exports):
        assert all(uri.startswith("nbds://127.0.0.1:") for uri in exports.values())
        uri = f"{exports['']}?tls-certificates={nbd_certificates.client}"
        copied = run("nbdcopy", uri, tmp_path / "copy")
        assert copied.returncode == 0, copied.stderr
        assert (tmp_path / "copy").read_bytes() == erofs_images.small.path.read_bytes()
        assert stop(proc) == 0
        assert proc.stderr.read() == ""


def test_serving_an_expired_certificate_says_so_at_start(pushed_images, nbd_certificates, tmp_path):
    """``serve --tls require`` with a server certificate that expired in 2020: stderr says
    at start that it expired, and when, naming the file, rather than leaving the operator
    only resets in the log as every checking client hangs up; nbdinfo is indeed refused.
    It is still served: a client that checks nothing (a mount's nbdfuse) reads it."""
    certificates = nbd_certificates.expired_server
    tls = ["--tls", "require", "--tls-certificates", str(certificates)]
    args = serve_args(pushed_images, tmp_path, "--listen", "127.0.0.1:0", *tls)
    with serving(*args) as (proc, exports):
        uri = f"{exports['']}?tls-certificates={nbd_certificates.client}"
        assert run("nbdinfo", "--size", uri).returncode != 0
        assert stop(proc) == 0
        stderr = proc.stderr.read()
    assert stderr.splitlines()[0] == (
        f"blockstore: warning: {certificates / 'server-cert.pem'} expired on 2020-02-01 00:00 "
        "UTC: clients that check it (nbdinfo, nbdcopy, qemu) will hang up"
    )


# Bound to 0.0.0.0, the warnings name every address of this machine: before, they named
# 0.0.0.0, which is no address anyone could reach.
WARNINGS = {
    "off": "warning: listening on every address of this machine (port {port}) without TLS: "
    "exports layer0 of {image} can be read by anyone who can reach this machine's port {port}, "
    "unencrypted and unauthenticated",
    "on": "warning: --tls on still serves plain clients: exports layer0 of {image} can be "
    "read by anyone who can reach this machine's port {port} without TLS, unencrypted and "
    "unauthenticated",
    "require": "note: exports layer0 of {image} are encrypted on every address of this "
    "machine (port {port}), but any TLS client that can reach it may read them",
    "require-verified": None,
}


@pytest.mark.parametrize("mode", list(WARNINGS))
def test_listening_beyond_loopback_says_what_is_exposed(
    registry, pushed_images, nbd_certificates, tmp_path, mode
):
    """Bound to 0.0.0.0 the real command says on stderr which exports of which image anyone
    who can reach the address may read, and how: plain (--tls off), plain still allowed
    (--tls on), encrypted to any TLS client (--tls require); nothing when clients must
    show a certificate."""
    tls = []
    if mode != "off":
        tls = ["--tls", mode.split("-")[0], "--tls-certificates", str(nbd_certificates.server)]
    if mode == "require-verified":
        tls.append("--tls-verify-peer")
    args = serve_args(pushed_images, tmp_path, "--listen", "0.0.0.0:0", *tls)
    with serving(*args) as (proc, exports):
        port = exports[""].split(":")[2].split("/")[0]
        assert stop(proc) == 0
        stderr = proc.stderr.read()
    expected = WARNINGS[mode]
    if expected is None:
        assert stderr == ""
    else:
        (line,) = stderr.splitlines()
        assert line.startswith("blockstore: ")
        assert expected.format(port=port, image=pushed_images.small) in line


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        (["--tls", "on"], 2, "--tls on needs --tls-certificates DIR"),
        (["--tls-verify-peer"], 2, "need --tls on or require"),
        (["--tls", "require", "--tls-certificates", "{nowhere}"], 2, "no such directory"),
        (["--tls", "require", "--tls-certificates", "{empty}"], 2, "lacks server-cert.pem"),
        (["--tls", "require", "--tls-certificates", "{keyless}"], 2, "lacks server-key.pem"),
        (["--tls", "on", "--tls-certificates", "{garbled}"], 2, "cannot load"),
        (["--tls", "on", "--tls-certificates", "{mismatched}"], 2, "is not the private key of"),
        (["--tls", "on", "--tls-certificates", "{encrypted}"], 2, "server-key.pem is encrypted"),
    ],
)
def test_bad_tls_options_are_one_line_errors(
    pushed_images, nbd_certificates, tmp_path, options, code, message
):
    """TLS options that cannot work are refused before anything is served, with one line
    and the usage exit code (2): a certificate directory that lacks a file, or holds one
    that cannot be used, is a file named that cannot be read or used, as the exit-code
    table has it, like one that does not exist (before, those exited 1). A key that
    parses but belongs to another certificate (the client's) is said to be that, not a
    file that is not PEM; an encrypted key is said to be one, and no passphrase is asked
    for on the terminal."""
    cert = (nbd_certificates.server / "server-cert.pem").read_bytes()
    names = ("nowhere", "empty", "keyless", "garbled", "mismatched", "encrypted")
    for name in names[1:]:
        (tmp_path / name).mkdir()
        if name != "empty":
            (tmp_path / name / "server-cert.pem").write_bytes(cert)
    (tmp_path / "garbled" / "server-key.pem").write_text("not a key\n")
    other_key = (nbd_certificates.client / "client-key.pem").read_bytes()
    (tmp_path / "mismatched" / "server-key.pem").write_bytes(other_key)
    key = nbd_certificates.server / "server-key.pem"
    encrypted = tmp_path / "encrypted" / "server-key.pem"
    run("openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", encrypted)
    paths = {name: str(tmp_path / name) for name in names}
    argv = [sys.executable, "-m", "blockstore", "serve", pushed_images.small, "--insecure"]
    argv += [option.format(**paths) for option in options]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, start_new_session=True
    )
    assert result.returncode == code and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert message in line


def test_serve_listens_on_loopback_by_default(registry, pushed_images, tmp_path):
    """Without --listen or --unix the server binds 127.0.0.1:10809 and warns of nothing;
    should another server hold that port, the error names the same loopback address."""
    argv = [sys.executable, "-m", "blockstore", "serve", *serve_args(pushed_images, tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        if first:
            assert first.split()[2] == "nbd://127.0.0.1:10809/layer0", first
            while proc.stdout.readline().strip() != "ready":
                pass
            assert stop(proc) == 0
            assert proc.stderr.read() == ""
        else:
            assert proc.wait(timeout=30) == 1
            assert "cannot listen on 127.0.0.1:10809" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _relayed_after_starttls(server: NBDServer) -> tuple[socket.socket, threading.Thread]:
    """A loopback port that takes one TLS client (``openssl s_client``, which knows no
    NBD) to ``server`` with the NBD haggling up to STARTTLS's ACK already done for it,
    then relays bytes both ways; returns the listening socket and the relay's thread."""
    listener = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(server.tcp_address, timeout=30)
        _read_exactly(upstream, 18)
        upstream.sendall(w.client_flags() + w.option(w.OPT_STARTTLS))
        assert _option_reply(upstream)[:2] == (w.OPT_STARTTLS, w.REP_ACK)

        def pump(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(30)
        client.close()
        upstream.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    return listener, thread


def test_a_client_asking_to_renegotiate_tls_is_refused(local_blob, nbd_certificates):
    """Tried: a TLS 1.2 client (``openssl s_client``'s ``R``) asks to renegotiate in the
    middle of a session. Must hold: the server refuses (a no_renegotiation alert, no
    second handshake): client-started renegotiation lets one client make the server
    do handshakes in a loop for free, and no NBD client needs it. The server says so
    itself rather than leave it to the OpenSSL it is linked with (3.0 refuses by
    default, 1.1.1 renegotiates as often as asked)."""
    server = _started_requiring_tls(local_blob, nbd_certificates)
    listener, relay = _relayed_after_starttls(server)
    try:
        port = listener.getsockname()[1]
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2"]
        argv += ["-CAfile", str(nbd_certificates.client / "ca-cert.pem"), "-msg"]
        client = subprocess.run(argv, input="R\n", capture_output=True, text=True, timeout=60)
        shown = client.stdout + client.stderr
        assert "RENEGOTIATING" in shown, shown
        assert shown.count("ServerHelloDone") == 1, shown  # one handshake, not two
        assert "Alert [length 0002], warning no_renegotiation" in shown, shown
    finally:
        listener.close()
        relay.join(30)
        server.shutdown()


def test_a_failed_tls_handshake_is_logged_before_its_alert_is_sent(local_blob, nbd_certificates):
    """Tried: a client that gets STARTTLS acknowledged, then offers TLS 1.1 only, with the
    server's log handler held at the failure's warning. Must hold: nothing reaches the
    client until the warning is written, then the alert that says why. A client failing
    on the alert (nbdfuse, a mount's attach) may read the server's log for the cause at
    once; an alert sent first let it read a log without it."""
    held = HeldHandler()
    logger = logging.getLogger("nbdfront.server")
    logger.addHandler(held)
    server = _started_requiring_tls(local_blob, nbd_certificates)
    try:
        with socket.create_connection(server.tcp_address, timeout=10) as sock:
            _read_exactly(sock, 18)
            sock.sendall(w.client_flags() + w.option(w.OPT_STARTTLS))
            assert _option_reply(sock)[:2] == (w.OPT_STARTTLS, w.REP_ACK)
            sock.sendall(old_client_hello())
            assert held.reached.wait(10)
            readable, _, _ = select.select([sock], [], [], 0.5)
            assert not readable, "the alert went out before the failure was logged"
            held.let_go.set()
            received = b""
            while piece := sock.recv(65536):
                received += piece
        assert received[:1] == b"\x15", received[:16]  # a TLS alert record
        assert "TLS handshake with" in held.said[0] and "unsupported protocol" in held.said[0]
    finally:
        held.let_go.set()
        logger.removeHandler(held)
        server.shutdown()


class HeldHandler(logging.Handler):
    """Holds the thread that logs the first warning until let go."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reached, self.let_go = threading.Event(), threading.Event()
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())
        self.reached.set()
        assert self.let_go.wait(10)


def old_client_hello() -> bytes:
    """The first flight of a client that speaks TLS 1.1 at most, which the server refuses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()
