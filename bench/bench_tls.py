"""What TLS costs: warm reads over nbds:// as a ratio to nbd:// on the same server.

One server with ``--tls on`` serves a warm cache (every read a checked hit)
to plain and TLS clients alike, so the only difference between the two runs
of each pair is TLS. Each workload runs plain then TLS, ``--repeats`` times,
and the medians and their ratio are printed: nbdcopy of the whole blob
(four connections) and fio's nbd engine, 4 KiB random reads at depth 16,
both the harness's own workloads. The blob is random bytes: TLS costs the
same whatever they are. Certificates are made with openssl as the tests
make them; the clients find theirs in ``$HOME/.pki/libnbd``.

    .venv/bin/python -m bench.bench_tls [--size-mib 128] [--seconds 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from bench.inprocess import warm_random_blob
from bench.workloads import Copy, RandomReads
from blockstore.cache import CachedBlob
from nbdfront.protocol import TLSPolicy
from nbdfront.server import NBDServer
from nbdfront.tls import ServerTLS, server_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from rig.nbd_certificates import make_nbd_certificates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128, help="size of the blob")
    parser.add_argument("--seconds", type=float, default=3.0, help="fio run time per test")
    parser.add_argument("--repeats", type=int, default=5, help="runs per test (median is kept)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    try:
        certificates = make_nbd_certificates(work / "certificates")
        # fio's engine refuses tls-certificates= in a URI (local file access), so the
        # clients find theirs where libnbd looks by default for a user: $HOME/.pki/libnbd.
        shutil.copytree(certificates.client, work / "home" / ".pki" / "libnbd")
        os.environ["HOME"] = str(work / "home")
        with warm_random_blob(work, args.size_mib) as (image, store):
            warm = CachedBlob(store, image.digest, image.size, None, name="blob")  # hits only
            tls = ServerTLS(TLSPolicy.ON, server_context(certificates.server))
            server = NBDServer({"blob": warm}, tcp=("127.0.0.1", 0), default_export="blob", tls=tls)
            server.start()
            host, port = server.tcp_address
            uris = {"nbd://": f"nbd://{host}:{port}/blob", "nbds://": f"nbds://{host}:{port}/blob"}
            rig, system = SimpleNamespace(image=image), SimpleNamespace(fetch_seconds=0.0)
            workloads = [Copy("nbdcopy, 4 connections", []), RandomReads(16, args.seconds)]
            print(f"blob: {image.size >> 20} MiB warm in the cache, median of {args.repeats}")
            print(f"{'':26s} {'nbd://':>14s} {'nbds://':>14s} {'TLS/plain':>10s}")
            for workload in workloads:
                runs: dict[str, list[float]] = {scheme: [] for scheme in uris}
                for _ in range(args.repeats):
                    for scheme, uri in uris.items():
                        outcome = workload.run([uri], rig, system)
                        runs[scheme].append(outcome.metrics[workload.primary])
                plain, secure = (statistics.median(runs[scheme]) for scheme in uris)
                unit = workload.primary
                print(
                    f"{workload.name:26s} {plain:9.0f} {unit:>4s} {secure:9.0f} {unit:>4s} "
                    f"{secure / plain:10.2f}"
                )
            server.shutdown()
            warm.close()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
