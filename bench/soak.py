"""Soak ``blockstore serve``: drive it with cycles of clients and faults, sample its resources.

Each cycle connects and disconnects (nbdinfo, plain and TLS), reads at random and sends
CACHE hints (libnbd), hangs up mid-handshake, mid-TLS-handshake and mid-reply; every
fifth copies the whole export (nbdcopy). Of every five cycles, one has the registry
answer 500, one reset its connections, one hold each blob request 2 s (a client then
hangs up while its reads wait), and every tenth stops the registry for a few reads,
then starts it again. With a cache cap under the layer's size (the default) reads keep
missing; with a larger one the layer is warm after the first copy. Every ``--every``
cycles it prints one row: resident memory, threads, open fds, LMDB reader slots held and a few
server metrics. What keeps growing after the first rows is a leak.

    .venv/bin/python bench/soak.py --cycles 300 --every 25 [--cache-size 2G] [--layer tar.gz]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import nbd

from blockstore.registry.push import EROFS_MEDIA_TYPE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "nbd"))
from nbd_wire import (
    CMD_CACHE,
    CMD_READ,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_STARTTLS,
    client_flags,
    option,
    request,
)
from rig.fault_proxy import Fault, FaultProxy
from rig.images import build_erofs, make_large_tree
from rig.nbd_certificates import make_nbd_certificates
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer

GZIP_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
METRICS = ("blockstore_nbd_open_connections", "blockstore_cache_stored_bytes")


def sample(pid: int, cache: Path, metrics_url: str) -> dict[str, float]:
    """The server's resident memory (anonymous, and mapped from files), threads, fds,
    reader slots and chosen metrics."""
    status = Path(f"/proc/{pid}/status").read_text()
    row: dict[str, float] = {
        # Apart: the file part is the cache's mapped pages, which the kernel takes back.
        "anon_kib": int(re.search(r"RssAnon:\s+(\d+)", status)[1]),
        "file_kib": int(re.search(r"RssFile:\s+(\d+)", status)[1]),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "readers": reader_slots(cache),
    }
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in METRICS:
            row[name] = row.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return row


def reader_slots(cache: Path) -> int:
    """Slots of the cache's LMDB reader table held, in a transaction or kept for one."""
    env = lmdb.open(str(cache), readonly=True, lock=True, max_dbs=64, subdir=True)
    try:
        return len(env.readers().splitlines()[1:])  # past the header, or "(no ...)"
    finally:
        env.close()


@contextmanager
def server(reference: str, workdir: Path, cache: Path, certificates: Path, cache_size: str):
    """``blockstore serve`` with TLS allowed and metrics on; yields (process, socket, url)."""
    sock = workdir / "serve.sock"
    argv = [sys.executable, "-m", "blockstore", "serve", reference, "--insecure"]
    argv += ["--cache-dir", str(cache), "--unix", str(sock), "--tls", "on"]
    argv += ["--tls-certificates", str(certificates), "--metrics", "127.0.0.1:0"]
    argv += ["--timeout", "3", "--cache-size", cache_size]
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    url = ""
    for line in proc.stdout:
        if line.startswith("metrics "):
            url = line.split()[1]
        if line.strip() == "ready":
            break
    try:
        yield proc, str(sock), url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def nbdinfo(uri: str) -> None:
    subprocess.run(["nbdinfo", uri], capture_output=True, timeout=60, check=False)


def random_reads(sock: str, rng: random.Random, size: int, count: int) -> int:
    """Random reads and CACHE hints over libnbd; how many reads failed."""
    handle = nbd.NBD()
    handle.connect_unix(sock)
    failed = 0
    for _ in range(count):
        offset = rng.randrange(0, size - 65536)
        try:
            handle.pread(rng.randrange(1, 65536), offset)
            handle.cache(131072, rng.randrange(0, size - 131072))
        except nbd.Error:
            failed += 1
    handle.shutdown()
    return failed


@contextmanager
def greeted(sock: str, first_option: bytes) -> Iterator[socket.socket]:
    """A raw client past the server's greeting, its flags and ``first_option`` sent;
    closed (a hang-up) when the block ends."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(sock)
        raw.recv(18)
        raw.sendall(client_flags(no_zeroes=True) + first_option)
        yield raw


def hang_up_mid_handshake(sock: str) -> None:
    """Send GO's header, announcing 100 bytes of data that never come."""
    with greeted(sock, option(OPT_GO)[:-4] + struct.pack(">I", 100)):
        pass


def hang_up_mid_tls(sock: str) -> None:
    """Ask for STARTTLS, then send half a ClientHello."""
    with greeted(sock, option(OPT_STARTTLS)) as raw:
        raw.recv(20)
        raw.sendall(bytes.fromhex("160301020001"))


def hang_up_mid_reply(sock: str, size: int) -> None:
    """Ask for 8 MiB and hang up before reading the reply."""
    with greeted(sock, option(OPT_EXPORT_NAME)) as raw:
        raw.recv(10)
        raw.sendall(request(CMD_READ, 1, 0, min(size, 8 << 20)))
        time.sleep(0.01)


def hang_up_while_fetching(sock: str, size: int, rng: random.Random) -> None:
    """Ask for reads and CACHE hints the registry holds back; hang up before the answers."""
    with greeted(sock, option(OPT_EXPORT_NAME)) as raw:
        raw.recv(10)
        offset = rng.randrange(0, size - 65536)
        for handle in range(4):
            raw.sendall(request((CMD_READ, CMD_CACHE)[handle % 2], handle, offset, 65536))
        time.sleep(0.2)


FAULTS = {
    3: Fault("status", path_contains="/blobs/", method="GET", status=500),
    4: Fault("reset", path_contains="/blobs/", method="GET", after_bytes=0),
    2: Fault("delay", path_contains="/blobs/", method="GET", seconds=2),
}


def cycle(
    n: int, sock: str, size: int, certificates: Path, proxy: FaultProxy, rng: random.Random
) -> int:
    """One cycle of clients; every 5th with a failing registry. Failed reads, returned."""
    proxy.fault = FAULTS.get(n % 5)
    nbdinfo(f"nbd+unix:///?socket={sock}")
    nbdinfo(f"nbds+unix:///?socket={sock}&tls-certificates={certificates}")
    if n % 5 == 0:
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"], timeout=120)
    hang_up_mid_handshake(sock)
    hang_up_mid_tls(sock)
    hang_up_mid_reply(sock, size)
    if n % 5 == 2:
        hang_up_while_fetching(sock, size, rng)
    return random_reads(sock, rng, size, 3 if proxy.fault else 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument(
        "--cache-size",
        default="40M",
        help="the server's cache cap: 40M (below the 64 MiB image) keeps it missing, "
        "2G has it warm after the first copy",
    )
    parser.add_argument("--layer", choices=("erofs", "tar.gz"), default="erofs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        registry = RegistryServer(work / "registry")
        registry.start()
        try:
            soak(work, registry, args)
        finally:
            registry.stop()


def build_layer(work: Path, kind: str) -> Path:
    """The soaked layer, built from ``work/tree``: an EROFS image or a tar.gz."""
    if kind == "erofs":
        return build_erofs(work / "tree", work / "large.erofs").path
    path = work / "large.tar.gz"
    subprocess.run(["tar", "-C", work / "tree", "-czf", path, "."], check=True)
    return path


def soak(work: Path, registry: RegistryServer, args: argparse.Namespace) -> None:
    make_large_tree(work / "tree")
    layer = build_layer(work, args.layer)
    media_type = EROFS_MEDIA_TYPE if args.layer == "erofs" else GZIP_MEDIA_TYPE
    reference = push_erofs(registry.host, "soak/large", "v1", [layer], media_type=media_type)
    certificates = make_nbd_certificates(work / "certs")
    proxy = FaultProxy(registry.url)
    proxy.start()
    proxied = reference.replace(registry.host, proxy.host)
    cache = work / "cache"
    rng = random.Random(1)
    failed = 0
    try:
        with server(proxied, work, cache, certificates.server, args.cache_size) as (
            proc,
            sock,
            url,
        ):
            uri = f"nbd+unix:///?socket={sock}"
            size = int(subprocess.check_output(["nbdinfo", "--size", uri]))
            for n in range(args.cycles + 1):
                if n % args.every == 0:
                    cells = " ".join(f"{k}={v:g}" for k, v in sample(proc.pid, cache, url).items())
                    print(f"cycle={n} failed={failed} {cells}", flush=True)
                if n % 10 == 7:
                    registry.stop()
                    failed += random_reads(sock, rng, size, 3)
                    registry.start()
                failed += cycle(n, sock, size, certificates.client, proxy, rng)
    finally:
        proxy.stop()


if __name__ == "__main__":
    main()
