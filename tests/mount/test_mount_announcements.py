"""What ``mount`` reads from the server's output, and the order it stacks exports in."""

from __future__ import annotations

from nbdfront.mount.server import layer_exports, parse_announcements, warnings_before_ready

SOCK = "nbd+unix:///{}?socket=%2Frun%2Fs.sock"


def test_exports_then_ready_among_log_lines():
    """Export lines and ``ready`` are found among timestamped log lines; the empty default
    export name may be printed as nothing or as ``""``."""
    text = "\n".join(
        [
            "2026-01-01 00:00:00 blockstore.image INFO resolving",
            f"export layer0 {SOCK.format('layer0')}",
            f'export "" {SOCK.format("")}',
            f"export layer1 {SOCK.format('layer1')}",
            "ready",
            "export late nbd://ignored",
        ]
    )
    exports, ready = parse_announcements(text)
    assert ready
    assert exports == {
        "layer0": SOCK.format("layer0"),
        "": SOCK.format(""),
        "layer1": SOCK.format("layer1"),
    }
    assert parse_announcements(f"export {SOCK.format('')}\n")[0] == {"": SOCK.format("")}


def test_not_ready_until_the_ready_line():
    """A server that has announced exports but not ``ready`` is not ready yet."""
    assert parse_announcements(f"export layer0 {SOCK.format('layer0')}\nrea") == (
        {"layer0": SOCK.format("layer0")},
        False,
    )


def test_layers_stack_by_number_and_the_default_export_is_left_out():
    """Layer exports stack by their number (layer10 above layer9), whatever order they were
    announced in; the default export ``""`` is only used when there is no layer export."""
    exports = {name: f"uri-{name}" for name in ["", "layer10", "layer2", "layer9"]}
    assert [name for name, _ in layer_exports(exports)] == ["layer2", "layer9", "layer10"]
    assert layer_exports({"": "uri"}) == [("", "uri")]
    assert layer_exports({"disk": "uri"}) == [("disk", "uri")]


def test_warnings_before_ready_lose_their_log_prefix():
    """WARNING lines logged before ``ready`` come back as their bare messages, in order;
    other levels, export lines and anything after ``ready`` do not."""
    text = "\n".join(
        [
            "2026-01-01 00:00:00,001 blockstore.image INFO resolving",
            "2026-01-01 00:00:00,002 blockstore.image WARNING registry down; serving x from "
            "the cache alone",
            f"export layer0 {SOCK.format('layer0')}",
            "2026-01-01 00:00:00,003 blockstore.cache WARNING cache nearly full",
            "2026-01-01 00:00:00,004 blockstore.cache ERROR not a warning",
            "ready",
            "2026-01-01 00:00:05,000 blockstore.fetch WARNING later, in the log only",
        ]
    )
    assert warnings_before_ready(text) == [
        "registry down; serving x from the cache alone",
        "cache nearly full",
    ]
