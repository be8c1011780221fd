"""Access traces: recorded on a cold open, moved between caches, replayed as prefetch.

The image is the fixture EROFS image in the real registry; the commands are
the real ``blockstore trace`` commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rig.pushed import push_erofs

from blockstore.cache import CHUNK_SIZE
from blockstore.cache.traces import TraceShelf
from blockstore.image import open_image
from blockstore.prefetch import PrefetchSettings, Trace
from blockstore.progress import human
from blockstore.registry import RegistryOptions

RECORD = PrefetchSettings(readahead=False, trace_period=30.0)
REPLAY = PrefetchSettings(readahead=False, trace_replay=True)
READS = [(5, 2), (0, 1), (9, 3), (2, 1)]  # (first chunk, chunks), in this order


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=60
    )


def open_layer(reference: str, cache_dir: Path, settings: PrefetchSettings):
    image = open_image(
        reference,
        cache_dir=cache_dir,
        options=RegistryOptions(insecure=True),
        prefetch=settings,
    )
    return image, image.exports()[-1]


def test_a_trace_is_recorded_exported_imported_and_replayed(pushed_images, erofs_images, tmp_path):
    """A cold open records the blocks it reads, first touches only, in order; the trace
    goes to a file with ``trace export`` and into an empty cache with ``trace import``
    (``ls`` and ``show`` list it there); a cold open of the same image in that cache then
    fetches the traced chunks (and the small holes between them, so as to ask in few
    requests) before anything is read, and every byte read afterwards is the image's.
    ``trace rm`` forgets it."""
    expected = erofs_images.small.path.read_bytes()
    first_cache, second_cache = tmp_path / "first", tmp_path / "second"
    image, layer = open_layer(pushed_images.small, first_cache, RECORD)
    for first, count in READS:
        layer.read(first * CHUNK_SIZE, count * CHUNK_SIZE)
    layer.read(5 * CHUNK_SIZE + 100, 10)  # already read: not a first touch
    image.close()
    order = [5, 6, 0, 9, 10, 11, 2]
    per_chunk = CHUNK_SIZE // 4096
    runs = [[first * per_chunk, count * per_chunk] for first, count in READS]

    exported = tmp_path / "traces.json"
    done = blockstore(
        "trace", "export", pushed_images.small, str(exported), "--cache-dir", str(first_cache)
    )
    assert done.returncode == 0, done.stderr
    [record] = json.loads(exported.read_text())["traces"]
    assert [event[1:] for event in record["events"]] == runs  # 4 KiB blocks, in runs
    assert record["digest"] == layer.digest and record["unit"] == 4096

    done = blockstore("trace", "import", str(exported), "--cache-dir", str(second_cache))
    assert done.returncode == 0, done.stderr
    listed = blockstore("trace", "ls", "--json", "--cache-dir", str(second_cache))
    assert [(r["digest"], r["blocks"]) for r in json.loads(listed.stdout)] == [
        (layer.digest, len(order) * per_chunk)
    ]
    named = blockstore("trace", "ls", layer.digest, "--cache-dir", str(second_cache))
    assert named.returncode == 0 and named.stdout.startswith(layer.digest), named.stderr
    unit = json.loads(listed.stdout)[0]["unit"]
    assert f"{len(order) * per_chunk} blocks of {human(unit)} (" in named.stdout, named.stdout
    other = blockstore("trace", "ls", "sha256:" + "0" * 64, "--cache-dir", str(second_cache))
    assert other.returncode == 3 and "no trace kept for" in other.stderr
    shown = blockstore("trace", "show", layer.digest, "--cache-dir", str(second_cache))
    assert shown.returncode == 0 and f"offset {order[0] * CHUNK_SIZE}, 64.0 KiB" in shown.stdout

    image, layer = open_layer(pushed_images.small, second_cache, REPLAY)
    store = image.store
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = store.lookup(layer.digest)
        if record is not None and not store.missing(record.blob_id, order):
            break
        time.sleep(0.02)
    assert store.missing(record.blob_id, order) == []
    assert record.present <= max(order) + 1  # the traced chunks, and small holes between
    got = b"".join(bytes(b) for b in layer.read(0, layer.size))
    image.close()
    assert got == expected

    done = blockstore("trace", "rm", layer.digest, "--cache-dir", str(second_cache))
    assert done.returncode == 0, done.stderr
    listed = blockstore("trace", "ls", "--json", "--cache-dir", str(second_cache))
    assert json.loads(listed.stdout) == []


def test_a_bad_trace_file_is_refused_in_one_line(tmp_path):
    """Importing a file that is not a trace export, or cannot be read, fails with one
    clear line, exit 2, and makes no cache; pushing the traces of a cache that does not
    exist fails at once (exit 8) and makes none either."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "blockstore-traces", "traces": [{"version": 1}]}))
    done = blockstore("trace", "import", str(bad), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not a trace record" in done.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\x00 not json")
    done = blockstore("trace", "import", str(garbage), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr == f"blockstore: {garbage}: not a traces document (not JSON text)\n"
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    done = blockstore(
        "trace", "import", str(tmp_path / "passwd"), "--cache-dir", str(tmp_path / "c")
    )
    assert done.returncode == 2 and "passwd: not a traces document (not JSON text)" in done.stderr
    missing = tmp_path / "nosuch.json"
    done = blockstore("trace", "import", str(missing), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2
    assert done.stderr == f"blockstore: cannot read {missing}: No such file or directory\n"
    assert not (tmp_path / "c").exists()
    done = blockstore("trace", "push", "127.0.0.1:9/x/y:1", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 8 and "no cache at" in done.stderr
    assert not (tmp_path / "c").exists()


def test_a_trace_whose_digest_is_not_a_layer_digest_is_refused_as_a_bad_file(tmp_path):
    """Tried: ``trace import`` of documents whose trace names ``sha256:`` and 600 hex
    digits (longer than a cache key may be), ``sha256:`` alone, and ``sha256:`` with a
    terminal escape. Must hold: each refused in one line as not a layer digest (exit 2),
    no cache made. Before, the long one failed as "the cache ... is damaged" (exit 8),
    and the others were kept, the escape then printed raw by ``trace ls``."""
    cache = tmp_path / "c"
    for digest in ("sha256:" + "a" * 600, "sha256:", "sha256:\x1b[31m" + "a" * 64):
        record = {"version": 2, "digest": digest, "unit": 4096, "recorded": 1.0}
        document = {"kind": "blockstore-traces", "traces": [{**record, "events": [[0, 0, 1]]}]}
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(document))
        done = blockstore("trace", "import", str(bad), "--cache-dir", str(cache))
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "not a layer digest" in done.stderr
        assert "\x1b" not in done.stderr
    assert not cache.exists()


def test_a_trace_file_too_long_to_be_an_export_is_refused_before_it_is_read_whole(tmp_path):
    """Tried: ``trace import`` of a 300 MiB file (a disk image named by mistake) and of
    ``/dev/zero``, in a process allowed 2 GiB of memory. Must hold: each refused in one
    line as longer than a traces document may be (exit 2), no cache made. Before, the
    file was read whole first: ``/dev/zero`` took memory until none was left."""
    import resource

    def small() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    image = tmp_path / "disk.img"
    with image.open("wb") as file:
        file.truncate(300 << 20)
    cache = tmp_path / "c"
    command = [sys.executable, "-m", "blockstore", "trace", "import", "--cache-dir", str(cache)]
    for path in (image, Path("/dev/zero")):
        done = subprocess.run(
            [*command, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=small,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"blockstore: {path}: longer than 256 MiB: not a traces document\n"
    assert not cache.exists()


def test_an_export_that_cannot_be_written_names_the_file_and_leaves_nothing(tmp_path, cache_dir):
    """Tried: ``trace export`` to a directory, and into a directory that does not exist.
    Must hold: one line naming the file given (exit 1), nothing left beside it. Before,
    the line named the export's own ``FILE.partial`` and, for a directory, left
    ``DIR.partial`` behind."""
    from blockstore.cache import ChunkStore

    digest = "sha256:" + "a" * 64
    with ChunkStore(cache_dir) as store:
        TraceShelf(store).put(Trace(digest, CHUNK_SIZE, 1.0, [(0, 1, 1)]))
    out = tmp_path / "out"
    out.mkdir()
    for target, why in ((out, "Is a directory"), (out / "no" / "t.json", "No such file")):
        done = blockstore("trace", "export", digest, str(target), "--cache-dir", str(cache_dir))
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"blockstore: cannot write {target}: {why}"), done.stderr
        assert done.stderr.count("\n") == 1 and ".partial" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p != cache_dir) == ["out"]
    assert list(out.iterdir()) == []


def test_an_export_to_a_name_that_names_no_file_is_refused_in_one_line(tmp_path, cache_dir):
    """Tried: ``trace export`` to ``.``, ``/`` and an empty name, which name no file.
    Must hold: one line saying the file cannot be written (exit 1), as for any other
    directory, and nothing written. Before, a ValueError traceback ("has an empty name")."""
    from blockstore.cache import ChunkStore

    digest = "sha256:" + "a" * 64
    with ChunkStore(cache_dir) as store:
        TraceShelf(store).put(Trace(digest, CHUNK_SIZE, 1.0, [(0, 1, 1)]))
    for target in (".", "/", ""):
        argv = ["trace", "export", digest, target, "--cache-dir", str(cache_dir)]
        done = subprocess.run(
            [sys.executable, "-m", "blockstore", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("blockstore: cannot write "), done.stderr
        assert done.stderr.count("\n") == 1
    assert [p for p in tmp_path.iterdir() if p != cache_dir] == []


def test_traces_are_kept_per_layer(tmp_path, cache_dir):
    """The shelf keeps one trace per layer digest; putting one again replaces it."""
    from blockstore.cache import ChunkStore
    from blockstore.prefetch import Trace

    with ChunkStore(cache_dir) as store:
        shelf = TraceShelf(store)
        shelf.put(Trace("sha256:" + "a" * 64, CHUNK_SIZE, 1.0, [(0, 1, 1), (5, 2, 1)]))
        shelf.put(Trace("sha256:" + "b" * 64, CHUNK_SIZE, 1.0, [(0, 7, 1)]))
        shelf.put(Trace("sha256:" + "a" * 64, CHUNK_SIZE, 2.0, [(0, 3, 1)]))
        assert {t.digest[-1]: t.order() for t in shelf.all()} == {"a": [3], "b": [7]}


def test_an_unreadable_kept_trace_is_replaced_by_the_attached_one(
    registry, erofs_images, tmp_path, caplog
):
    """A cache keeps a trace of the layer that it cannot read (another version's format):
    a cold open still opens, says so in a warning, and takes the trace attached to the
    image in its place. `trace ls` of a cache with such a record lists the readable
    traces and names the bad one, rather than failing on it."""
    from blockstore.cache import ChunkStore
    from blockstore.cache.layout import DB_TRACES
    from blockstore.registry import RegistryOptions

    path = erofs_images.layers[0].path
    ref = push_erofs(registry.host, "traces/unreadable", "v1", [path])
    image, layer = open_layer(ref, tmp_path / "a", RECORD)
    layer.read(3 * CHUNK_SIZE, 4096)
    image.close()
    pushed = blockstore("trace", "push", ref, "--insecure", "--cache-dir", str(tmp_path / "a"))
    assert pushed.returncode == 0, pushed.stderr
    digest = image.resolved.layers[0].digest
    bad = json.dumps({"version": 99, "digest": digest}).encode()
    with ChunkStore(tmp_path / "b") as store:
        TraceShelf(store).put(Trace("sha256:" + "c" * 64, CHUNK_SIZE, 1.0, [(0, 1, 1)]))
        store.env.write(lambda txn: txn.put(digest.encode(), bad, db=store.env.dbs[DB_TRACES]))
    listed = blockstore("trace", "ls", "--cache-dir", str(tmp_path / "b"))
    assert listed.returncode == 0, listed.stderr
    assert "sha256:" + "c" * 64 in listed.stdout and digest in listed.stderr

    opened = open_image(
        ref,
        cache_dir=tmp_path / "b",
        options=RegistryOptions(insecure=True),
        prefetch=REPLAY,
    )
    try:
        trace = TraceShelf(opened.store).get(digest)
        assert trace is not None and 3 in trace.in_units_of(CHUNK_SIZE)
    finally:
        opened.close()
    assert "unreadable" in caplog.text


def test_an_export_with_the_file_and_the_image_swapped_says_so(pushed_images, tmp_path):
    """Tried: ``trace export traces.json IMAGE``, the image (cached, with a trace) given
    as FILE and the file as IMAGE. Must hold: a usage error (exit 2) in one line saying
    the arguments are the wrong way round, nothing written. Before, exit 3 with "no image
    registry-1.docker.io/library/traces.json:latest in the cache", saying nothing of the
    order."""
    cache = tmp_path / "cache"
    image, layer = open_layer(pushed_images.small, cache, RECORD)
    layer.read(0, CHUNK_SIZE)
    image.close()
    swapped = ["trace", "export", "traces.json", pushed_images.small, "--cache-dir", str(cache)]
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", *swapped],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "the wrong way round" in line and "trace export IMAGE|DIGEST FILE" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_dash_for_the_trace_file_is_standard_output_and_input(tmp_path, cache_dir):
    """Tried: ``trace export DIGEST -``, its output piped to ``trace import -`` of another
    cache, ``push -`` (a layer from standard input) and ``mount --trace-file -``.
    Must hold: as for most Unix tools, ``-`` is standard output (the document alone on
    it, no file named ``-`` written) and standard input (the traces imported);
    ``push``, which reads each layer twice, and ``mount``, whose server reads the file
    once started, refuse ``-`` in one line (exit 2). Before, export wrote a file named
    ``-``, import looked for one, and push said only "No such file or directory"."""
    from blockstore.cache import ChunkStore

    digest = "sha256:" + "a" * 64
    with ChunkStore(cache_dir) as store:
        TraceShelf(store).put(Trace(digest, CHUNK_SIZE, 1.0, [(0, 1, 1)]))

    def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "blockstore", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            input=stdin,
            timeout=60,
        )

    exported = run("trace", "export", digest, "-", "--cache-dir", str(cache_dir))
    assert exported.returncode == 0 and exported.stderr == "", exported.stderr
    assert [t["digest"] for t in json.loads(exported.stdout)["traces"]] == [digest]
    assert not (tmp_path / "-").exists()
    other = tmp_path / "other"
    imported = run("trace", "import", "-", "--cache-dir", str(other), stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    listed = run("trace", "ls", "--json", "--cache-dir", str(other))
    assert [row["digest"] for row in json.loads(listed.stdout)] == [digest]
    pushed = run("push", "-", "127.0.0.1:9/x/y:1", "--insecure")
    assert pushed.returncode == 2 and pushed.stderr.count("\n") == 1, pushed.stderr
    assert "standard input" in pushed.stderr and "give a file" in pushed.stderr
    (tmp_path / "mnt").mkdir()
    argv = ["mount", "127.0.0.1:9/x/y:1", str(tmp_path / "mnt"), "--trace-file", "-"]
    mounted = run(*argv, "--insecure", "--cache-dir", str(other))
    assert mounted.returncode == 2 and "trace import -" in mounted.stderr, mounted.stderr


def test_trace_ls_of_a_cache_with_no_traces_says_so(cache_dir):
    """Tried: ``trace ls`` and ``trace ls --json`` of a cache that holds no trace.
    Must hold: one line saying no trace is kept, as ``mounts`` says there are none and
    ``cache ls`` prints its header; ``[]`` with ``--json``; exit 0. Before, it printed
    nothing, which looks like a command that did not run."""
    from blockstore.cache import ChunkStore

    ChunkStore(cache_dir).close()
    listed = blockstore("trace", "ls", "--cache-dir", str(cache_dir))
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "no traces kept\n", "")
    listed = blockstore("trace", "ls", "--json", "--cache-dir", str(cache_dir))
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
