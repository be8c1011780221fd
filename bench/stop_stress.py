"""Stop ``blockstore serve`` many times, in the states that race its teardown.

Each round starts a server on a layer of 64 MiB and stops it with SIGTERM or SIGINT
(a second signal just after, in some rounds) in one state, picked at random:

- ``stuck``: another process holds the cache's write lock, stopped (Ctrl-Z on a
  prefetch), while a libnbd client reads hits and misses at depth 16;
- ``stuck_release``: the same, the stopped process let go within 0.6 s of the signal,
  so writes waiting in LMDB wake while the server ends;
- ``stuck_idle``: the lock so held, no client;
- ``stuck_nbdcopy``: the lock so held, an empty cache read whole with nbdcopy, then
  the signal at once (the stop then leaves writes behind the lock at once);
- ``slow_client``: a client that stopped reading, its replies stuck in the socket;
- ``stuck_slow_client``: both;
- ``cold``: an empty cache, a client reading, fetches in flight from the registry.

A round fails where the server's exit status is a signal or another code than 0, it
does not end within 30 s, its stderr holds a traceback or a fatal error, ``cache
verify`` is not clean after, or a process still has the cache open. The server runs
as its entry point runs it, told when the interpreter's teardown begins with a thread
inside LMDB: those rounds are counted (``teardown``), and must be none.

    .venv/bin/python bench/stop_stress.py --rounds 100 --workers 3 [--states stuck,cold]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from rig.images import build_images  # noqa: E402
from rig.pushed import push_fixture_images  # noqa: E402
from rig.registry_server import RegistryServer  # noqa: E402

from blockstore.openers import processes_with_open  # noqa: E402

STATES = (
    "stuck",
    "stuck_release",
    "stuck_idle",
    "stuck_nbdcopy",
    "slow_client",
    "stuck_slow_client",
    "cold",
)
TEARDOWN = "teardown began with a thread inside LMDB"

# The server as its entry point runs it, saying whether the interpreter's teardown (its
# first step: threading's exit functions) began while a thread was inside LMDB.
_WATCHED = f"""
import sys, threading
def teardown():
    from blockstore.cache import env
    envs = list(env.CacheEnv._open.values())
    if env._write_lock_watch._waits or any(e._gate.holders for e in envs):
        print({TEARDOWN!r}, file=sys.stderr, flush=True)
threading._register_atexit(teardown)
from blockstore.__main__ import run
sys.exit(run())
"""

_HOLD = """
import os, signal, sys
from pathlib import Path
from blockstore.cache import ChunkStore
store = ChunkStore(Path(sys.argv[1]))
txn = store.env.env.begin(write=True)
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""

_CLIENT = """
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size, rng, inflight = h.get_size(), random.Random(), [0]
def done(*_):
    inflight[0] -= 1
    return 1
print("reading", flush=True)
try:
    while True:
        while inflight[0] < 16:
            length = rng.choice([4096, 65536, 1 << 20])
            offset = rng.randrange(0, size - length) & ~4095
            h.aio_pread(nbd.Buffer(length), offset, completion=done)
            inflight[0] += 1
        h.poll(-1)
except nbd.Error:
    pass
"""


@dataclass
class Round:
    state: str
    signals: list[signal.Signals]
    status: int | str
    took: float
    problems: list[str]

    def line(self) -> str:
        said = "+".join(s.name for s in self.signals)
        trouble = " ".join(self.problems) or "ok"
        return f"{self.state:18} {said:16} exit {self.status!s:5} {self.took:5.2f}s {trouble}"


def python(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, text=True, **kw)


def one_round(images: tuple[str, str], work: Path, rng: random.Random, states: list[str]) -> Round:
    """One server started and stopped in a state picked from ``states``."""
    state = rng.choice(states)
    signals = [rng.choice([signal.SIGTERM, signal.SIGINT])]
    if rng.random() < 0.4:
        signals.append(rng.choice([signal.SIGTERM, signal.SIGINT]))
    cache, sock = work / "cache", work / "serve.sock"
    if state in ("cold", "stuck_nbdcopy") or rng.random() < 0.3:
        shutil.rmtree(cache, ignore_errors=True)
    image = images[1] if state == "stuck_nbdcopy" else images[0]
    argv = ["serve", image, "--insecure", "--cache-dir", str(cache), "--unix", str(sock)]
    server = python("-c", _WATCHED, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    helpers: list[subprocess.Popen] = []
    try:
        if "ready\n" not in iter(server.stdout.readline, ""):  # its export lines come first
            raise RuntimeError(f"the server did not start: {server.stderr.read()}")
        took, status, err = _stop(server, state, rng, signals, cache, sock, helpers)
    finally:
        for proc in [*helpers, server]:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
    return Round(state, signals, status, took, _problems(status, err, cache))


def _stop(
    server: subprocess.Popen,
    state: str,
    rng: random.Random,
    signals: list[signal.Signals],
    cache: Path,
    sock: Path,
    helpers: list[subprocess.Popen],
) -> tuple[float, int | str, str]:
    """Bring the server to ``state``, signal it, and wait for it."""
    uri = f"nbd+unix:///?socket={sock}"
    if state.startswith("stuck"):
        helpers.append(python("-c", _HOLD, str(cache), stdout=subprocess.PIPE))
        assert helpers[-1].stdout.readline().strip() == "holding"
    if state == "stuck_nbdcopy":
        subprocess.run(["nbdcopy", uri, "null:"], timeout=60, check=False)
    elif state != "stuck_idle":
        helpers.append(python("-c", _CLIENT, uri, stdout=subprocess.PIPE))
        helpers[-1].stdout.readline()
        time.sleep(rng.choice([0.1, 0.5, 1.0, 2.2, 2.6, 3.0]))
    if state.endswith("slow_client"):
        helpers[-1].send_signal(signal.SIGSTOP)
        time.sleep(rng.uniform(0.1, 0.5))
    started = time.monotonic()
    for signum in signals:
        server.send_signal(signum)
        time.sleep(rng.uniform(0, 0.3))
    if state == "stuck_release":
        time.sleep(rng.uniform(0, 0.6))
        helpers[0].send_signal(signal.SIGCONT)
        helpers[0].kill()
    try:
        status: int | str = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        status = "hung"
    return time.monotonic() - started, status, server.stderr.read() if status != "hung" else ""


def _problems(status: int | str, err: str, cache: Path) -> list[str]:
    problems = []
    if status != 0:
        problems.append(f"exit {status}")
    if "Traceback" in err or "Fatal Python error" in err:
        problems.append("traceback")
    if TEARDOWN in err:
        problems.append("teardown")
    if (cache / "lock.mdb").exists() and processes_with_open([str(cache / "lock.mdb")]):
        problems.append("left open")
    argv = ["-m", "blockstore", "cache", "verify", "--cache-dir", str(cache)]
    verify = python(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, verr = verify.communicate()
    if verify.returncode != 0:
        problems.append(f"verify {verify.returncode}: {(out + verr).strip()[-200:]}")
    return problems


def worker(
    images: tuple[str, str], work: Path, rounds: int, seed: int, states: list[str], done: list
) -> None:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    for _ in range(rounds):
        result = one_round(images, work, rng, states)
        done.append(result)
        print(result.line(), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds per worker")
    parser.add_argument("--workers", type=int, default=2, help="servers stopped side by side")
    parser.add_argument("--states", default=",".join(STATES), help="states to pick from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    states = args.states.split(",")
    with tempfile.TemporaryDirectory(prefix="stop-stress-") as tmp:
        base = Path(tmp)
        registry = RegistryServer(base / "registry")
        registry.start()
        try:
            fixtures = build_images(base / "erofs")
            pushed = push_fixture_images(registry.host, fixtures)
            images = (pushed.large, pushed.small)
            done: list[Round] = []
            threads = [
                threading.Thread(
                    target=worker,
                    args=(images, base / f"w{i}", args.rounds, args.seed + i, states, done),
                )
                for i in range(args.workers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            registry.stop()
    failed = [r for r in done if r.problems]
    print(f"{len(done)} stops, {len(failed)} failed:", dict(Counter(r.state for r in done)))
    for result in failed:
        print("FAILED", result.line())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
