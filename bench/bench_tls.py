"""What TLS costs: warm reads over nbds:// as a ratio to nbd:// on the same server.

One server with ``--tls on`` serves a warm cache (every read a checked hit)
to plain and TLS clients alike, so the only difference between the two runs
of each pair is TLS. Each test runs plain then TLS, ``--repeats`` times,
and the medians and their ratio are printed: nbdcopy of the whole image
(four connections) and fio's nbd engine, 4 KiB random reads at depth 16.
Certificates are made with openssl as the tests make them; the
clients find theirs in ``$HOME/.pki/libnbd``.

    .venv/bin/python bench/bench_tls.py [--size-mib 128] [--seconds 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_nbd import build_image, fio_rate, nbdcopy_rate, sha256_of

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.source import LocalFileSource
from nbdfront.protocol import TLSPolicy
from nbdfront.server import NBDServer
from nbdfront.tls import ServerTLS, server_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from rig.nbd_certificates import make_nbd_certificates

TESTS = {
    "nbdcopy, 4 connections": lambda uri, size, seconds: nbdcopy_rate(uri, size, []),
    "fio randread 4k depth 16": lambda uri, size, s: fio_rate(uri, size, "randread", "4k", 16, s),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128, help="size of the image to build")
    parser.add_argument("--seconds", type=float, default=3.0, help="fio run time per test")
    parser.add_argument("--repeats", type=int, default=5, help="runs per test (median is kept)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    try:
        certificates = make_nbd_certificates(work / "certificates")
        # fio's engine refuses tls-certificates= in a URI (local file access), so the
        # clients find theirs where libnbd looks by default: $HOME/.pki/libnbd.
        shutil.copytree(certificates.client, work / "home" / ".pki" / "libnbd")
        os.environ["HOME"] = str(work / "home")
        image = build_image(work, args.size_mib)
        size = image.stat().st_size
        digest = sha256_of(image)
        source = LocalFileSource(image, digest)
        store = ChunkStore(work / "cache", size_cap=4 * size)
        CachedBlob(store, digest, size, source).prefetch()
        warm = CachedBlob(store, digest, size, None, name="image")  # offline: hits only
        tls = ServerTLS(TLSPolicy.ON, server_context(certificates.server))
        server = NBDServer({"image": warm}, tcp=("127.0.0.1", 0), default_export="image", tls=tls)
        server.start()
        host, port = server.tcp_address
        plain = f"nbd://{host}:{port}/image"
        secure = f"nbds://{host}:{port}/image"
        print(f"image: {size / 2**20:.0f} MiB, median of {args.repeats}")
        print(f"{'':28s} {'nbd://':>12s} {'nbds://':>12s} {'TLS/plain':>10s}")
        for name, test in TESTS.items():
            plain_runs, tls_runs = [], []
            for _ in range(args.repeats):
                plain_runs.append(test(plain, size, args.seconds))
                tls_runs.append(test(secure, size, args.seconds))
            a, b = statistics.median(plain_runs), statistics.median(tls_runs)
            print(f"{name:28s} {a:6.0f} MiB/s {b:6.0f} MiB/s {b / a:10.2f}")
        server.shutdown()
        warm.close()
        store.close()
        source.close()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
