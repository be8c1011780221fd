"""The readiness pipe between a mount and its server, over real pipes, and the stacking order."""

from __future__ import annotations

import logging
import os
import select
import threading
import time

import pytest
from rig.write_lock import stopped_writer

import blockstore.progress as progress_mod
from nbdfront.mount import readiness
from nbdfront.mount.readiness import Failed, ReadinessPipe, Ready, Silent, TimedOut
from nbdfront.mount.server import layer_exports

SOCK = "nbd+unix:///{}?socket=%2Frun%2Fs.sock"


@pytest.fixture
def pipe():
    """A real pipe; the test owns the write end (hands it on, or closes it)."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)


def test_ready_with_exports_and_warnings_arrives_whole(pipe):
    """The server's ready line, written in two pieces, comes back as the exports in their
    order and the warnings it logged before ready; a warning logged after is not in it."""
    read_end, write_end = pipe
    exports = {"layer0": SOCK.format("layer0"), "": SOCK.format("")}
    with ReadinessPipe(write_end) as server_end:
        logging.getLogger("blockstore.image").warning("registry down; serving %s", "x")
        logging.getLogger("blockstore.image").info("not a warning")
        server_end.ready(exports)
        logging.getLogger("blockstore.fetch").warning("later, in the log only")
    assert readiness.receive(read_end, 5) == Ready(exports, ["registry down; serving x"])
    assert readiness.receive(read_end, 5) == Silent()  # said once, then closed


def test_an_error_before_ready_is_said_on_the_pipe(pipe):
    """An exception that escapes the server before ready reaches the mount as the error, in
    the server's own words, and still goes on to end the server."""
    read_end, write_end = pipe
    with pytest.raises(LookupError), ReadinessPipe(write_end):
        raise LookupError("the image has no layer 7")
    assert readiness.receive(read_end, 5) == Failed("the image has no layer 7")


def test_a_pipe_closed_without_a_word_is_silent_at_once(pipe):
    """A server gone without a status line is seen at the end-of-file, not at the timeout."""
    read_end, write_end = pipe
    os.close(write_end)
    started = time.monotonic()
    assert readiness.receive(read_end, 30) == Silent()
    assert time.monotonic() - started < 1


def test_nothing_said_times_out(pipe):
    """A server that neither speaks nor exits is given up on at the deadline, not later."""
    read_end, write_end = pipe
    started = time.monotonic()
    assert readiness.receive(read_end, 0.3) == TimedOut()
    assert 0.3 <= time.monotonic() - started < 2
    os.close(write_end)


def test_a_line_in_pieces_waits_for_its_end(pipe):
    """A line written slowly is read whole: the first bytes alone are not a status."""
    read_end, write_end = pipe
    line = readiness.encode_ready({"": SOCK.format("")}, [])

    def trickle() -> None:
        for i in range(0, len(line), 7):
            os.write(write_end, line[i : i + 7])
            time.sleep(0.01)

    writer = threading.Thread(target=trickle)
    writer.start()
    assert readiness.receive(read_end, 5) == Ready({"": SOCK.format("")}, [])
    writer.join()
    os.close(write_end)


@pytest.mark.parametrize(
    "line",
    [
        b"ready",
        b"{}",
        b'{"ready": true}',
        b'{"ready": true, "exports": ["a"]}',
        b'{"ready": true, "exports": {"a": 1}}',
        b'{"ready": false}',
        b"[1, 2]",
        b"\xff\xfe",
    ],
)
def test_a_line_that_does_not_parse_is_a_failure_never_ready(line):
    """What is not a well-formed status is the server failing to say it: never taken as
    ready, and the message quotes what came."""
    status = readiness.decode(line)
    assert isinstance(status, Failed) and "does not parse" in status.error


def test_layers_stack_by_number_and_the_default_export_is_left_out():
    """Layer exports stack by their number (layer10 above layer9), whatever order they were
    announced in; the default export ``""`` is only used when there is no layer export."""
    exports = {name: f"uri-{name}" for name in ["", "layer10", "layer2", "layer9"]}
    assert [name for name, _ in layer_exports(exports)] == ["layer2", "layer9", "layer10"]
    assert layer_exports({"": "uri"}) == [("", "uri")]
    assert layer_exports({"disk": "uri"}) == [("disk", "uri")]


def test_long_work_before_ready_is_heard_as_progress_lines(pipe, monkeypatch):
    """Tried: a server whose first open reads a layer for a while (the progress logger
    says how far it has got) before it is ready. Must hold: each line reaches the
    mount's ``on_progress`` in order, then the ready status; progress said after ready
    stays in the log. The lines come from ``Progress`` as a layer pass makes them."""
    monkeypatch.setattr(progress_mod, "EVERY", 0.0)
    read_end, write_end = pipe
    exports = {"layer0": SOCK.format("layer0")}
    with ReadinessPipe(write_end) as server_end:
        work = progress_mod.Progress("sha256:ab: reading the layer once to index it", 4 << 30)
        work.reached(1 << 30)
        work.reached(3 << 30)
        progress_mod.Progress("sha256:cd: tar made to index it", None).reached(12 << 30)
        server_end.ready(exports)
        work.reached(4 << 30)
    heard: list[str] = []
    assert readiness.receive(read_end, 5, heard.append) == Ready(exports, [])
    assert heard == [
        "sha256:ab: reading the layer once to index it: 1.0 GiB of 4.0 GiB (25%)",
        "sha256:ab: reading the layer once to index it: 3.0 GiB of 4.0 GiB (75%)",
        "sha256:cd: tar made to index it: 12.0 GiB so far",
    ]


def test_a_wait_for_a_stopped_writer_before_ready_is_heard_as_progress(pipe, monkeypatch, tmp_path):
    """Tried: another process takes the cache's write lock and is stopped (Ctrl-Z on a
    prefetch) while a server, not ready yet, writes to the cache. Must hold: the wait is
    said on the readiness pipe as progress, naming the cache and the stopped holder, so
    a mount waiting on that server tells its user why; once the holder is gone, the
    write goes through and the server gets ready. Before, it was said in the server's
    log only, and the mount waited with nothing on its terminal."""
    import signal

    from blockstore.cache import ChunkStore, write_lock_watch

    monkeypatch.setattr(write_lock_watch, "WRITE_LOCK_WARN", 0.5)
    cache = tmp_path / "cache"
    store = ChunkStore(cache)  # opened first: opening takes the write lock too
    read_end, write_end = pipe
    exports = {"layer0": SOCK.format("layer0")}
    try:
        with stopped_writer(cache) as holder, ReadinessPipe(write_end) as server_end:
            writing = threading.Thread(target=lambda: store.pin("sha256:" + "7" * 64, 1))
            writing.start()
            # The watch looks once a second: its first progress line, whenever it comes.
            assert select.select([read_end], [], [], 30)[0], "the wait was never said"
            holder.send_signal(signal.SIGCONT)
            holder.kill()
            writing.join(timeout=30)
            assert not writing.is_alive()
            server_end.ready(exports)
    finally:
        store.close()
    heard: list[str] = []
    status = readiness.receive(read_end, 5, heard.append)
    assert isinstance(status, Ready) and status.exports == exports
    assert any("so far for the write lock of the cache at" in line for line in heard), heard
    assert any("Ctrl-Z" in line for line in heard)
