"""Taking down, after a test, the mounts it left recorded."""

from __future__ import annotations

from nbdfront.mount import records, unmount


def take_down_recorded() -> list[tuple[str, Exception]]:
    """Undo every mount recorded in the run directory, the innermost first (a mount with
    another inside it is refused), record and all, with none of ``umount``'s checks: a
    test may have left one half made. Returns the mount points that could not be undone,
    with why, for the caller to say or to fail on."""
    failed = []
    for record in sorted(records.saved(), key=lambda r: len(r.mountpoint), reverse=True):
        try:
            unmount.take_down(record, lazy=True)
            records.forget(record)
        except Exception as exc:
            failed.append((record.mountpoint, exc))
    return failed
