"""Handshake to first read: this server beside ``nbdkit file``, libnbd's tools as clients.

One warm cache serves ``--exports`` copies of a random blob (every read a
checked hit), and ``nbdkit file dir=`` serves as many copies of the blob
file. Each round runs every client against both servers in turn, so load
on the machine falls on both alike; the medians of the rounds and their
ratio are printed:

- ``nbdinfo --list``: every export's name, size and metadata contexts;
- ``nbdinfo URI``: one export, as a user looks at it;
- ``nbdsh connect+pread``: ``connect_uri`` then one 4 KiB ``pread``, timed
  inside the client (no interpreter start-up), which is the handshake and
  the first read;
- ``nbdsh whole``: the same ``nbdsh`` process's wall time;
- ``nbdsh look at all``: what ``nbdinfo --list`` asks of each export (its
  facts, its metadata contexts), then the first read, timed inside the
  client, with a query named in the contexts' listing: libnbd (1.14) sends
  a listing of no queries with ``MSG_MORE`` on its last write, which the
  kernel holds for 200 ms, whatever the server (``nbdinfo`` pays that once
  per export, both servers alike).

    .venv/bin/python -m bench.bench_handshake [--exports 8] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.inprocess import warm_random_blob
from bench.processes import ForkingDaemon, free_port
from blockstore.cache import CachedBlob
from nbdfront.server import NBDServer

# nbdsh is ``python3 -m nbd``; run by this interpreter, which has libnbd's module.
NBDSH = [sys.executable, "-m", "nbd"]
# Inside nbdsh: the handshake and the first read, timed where they happen.
FIRST_READ = (
    "import time; t = time.perf_counter(); h.connect_uri({uri!r}); h.pread(4096, 0); "
    "print(time.perf_counter() - t)"
)
# Inside nbdsh: every export's facts and contexts, then the first read.
LOOK_AT_ALL = """
import time
names = []
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
t = time.perf_counter()
h.connect_uri({uri!r})
h.opt_list(lambda name, description: names.append(name))
for name in names:
    h.set_export_name(name)
    h.opt_info()
    h.opt_list_meta_context(lambda context: None)
h.set_export_name(names[0])
h.opt_go()
h.pread(4096, 0)
print(time.perf_counter() - t)
"""


def wall(argv: list[str]) -> float:
    """Seconds ``argv`` takes, start to exit; it must succeed."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def inside_nbdsh(template: str, uri: str) -> float:
    """The seconds that ``template``, given ``uri``, prints when nbdsh runs it."""
    script = template.format(uri=uri)
    out = subprocess.run([*NBDSH, "-c", script], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def clients(base: str, export: str) -> dict[str, Callable[[], float]]:
    """Each measurement, by name, against the server at ``base`` (``nbd://host:port``)."""
    uri = f"{base}/{export}"
    nbdsh_whole = [*NBDSH, "-u", uri, "-c", "h.pread(4096, 0)"]
    return {
        "nbdinfo --list": lambda: wall(["nbdinfo", "--list", base]),
        "nbdinfo URI": lambda: wall(["nbdinfo", uri]),
        "nbdsh connect+pread": lambda: inside_nbdsh(FIRST_READ, uri),
        "nbdsh whole": lambda: wall(nbdsh_whole),
        "nbdsh look at all": lambda: inside_nbdsh(LOOK_AT_ALL, base),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", type=int, default=8, help="exports on each server")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--size-mib", type=int, default=4, help="size of the blob")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-handshake-"))
    try:
        with warm_random_blob(work, args.size_mib) as (image, store):
            names = [f"layer{i}" for i in range(args.exports)]
            exports_dir = work / "exports"
            exports_dir.mkdir()
            for name in names:
                os.link(image.path, exports_dir / name)
            warm = {
                name: CachedBlob(store, image.digest, image.size, None, name=name) for name in names
            }
            server = NBDServer(warm, tcp=("127.0.0.1", 0), default_export=names[0])
            server.start()
            host, port = server.tcp_address
            nbdkit_port = free_port()
            pidfile = work / "nbdkit.pid"
            listen = ["-i", "127.0.0.1", "-p", str(nbdkit_port)]
            nbdkit = ForkingDaemon(
                ["nbdkit", "-r", *listen, "-P", str(pidfile), "file", f"dir={exports_dir}"],
                pidfile,
                work / "nbdkit.log",
            )
            systems = {
                "engine": clients(f"nbd://{host}:{port}", names[0]),
                "nbdkit file": clients(f"nbd://127.0.0.1:{nbdkit_port}", names[0]),
            }
            runs: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for system, measures in systems.items():
                    for measure, run in measures.items():
                        runs.setdefault((system, measure), []).append(run())
            print(f"{args.exports} exports, median of {args.rounds} interleaved rounds, ms")
            print(f"{'':22s} {'engine':>10s} {'nbdkit file':>12s} {'ratio':>7s}")
            for measure in systems["engine"]:
                ours, theirs = (statistics.median(runs[(s, measure)]) * 1000 for s in systems)
                print(f"{measure:22s} {ours:10.2f} {theirs:12.2f} {ours / theirs:7.2f}")
            nbdkit.stop()
            server.shutdown()
            for blob in warm.values():
                blob.close()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
