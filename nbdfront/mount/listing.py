"""How each mount this machine has stands: what ``blockstore mounts`` lists."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from blockstore.errors import NotPermitted
from nbdfront.mount import records, syscall
from nbdfront.mount.finding import (
    followed,
    hider,
    standing_state_dirs,
    unrecorded,
    where_ours_is,
)
from nbdfront.mount.records import MountRecord


@dataclass
class MountStatus:
    """A recorded mount (or one read back without its record) and how it stands."""

    record: MountRecord
    mounted: bool
    server_alive: bool
    attached: bool
    recorded: bool = True
    """False: the record is gone and ``record`` was read back from what the kernel shows
    (``unrecorded``), which names no image, layers or attach method."""
    hidden_by: str | None = None
    """Where the mount that hides its tree is: over a directory above it, or over it at
    its own mount point (then that); None if none does."""
    record_damaged: bool = False
    """Not recorded because its record does not parse (a crash, an edit), not gone."""

    @property
    def state(self) -> str:
        """``ok``, ``mounting``, or what broke: a user reads it to decide to unmount and
        mount again. A hidden mount is said so first: nothing else can be done to it
        until the mount that hides it is gone."""
        if not self.recorded:
            return "record damaged" if self.record_damaged else "record gone"
        if self.record.mounting:
            return "mounting"
        if not self.mounted:
            return "not mounted"
        if self.hidden_by is not None:
            return "hidden"
        if self.record.server is not None and not self.server_alive:
            return "server dead"
        if not self.attached:
            return "nbdfuse dead"
        return "ok"


def status(record: MountRecord, *, recorded: bool = True) -> MountStatus:
    """How the recorded mount stands, by what the kernel shows: its own top mount at the
    mount point, not merely some mount there (the user's, made in its place or over it)."""
    where = where_ours_is(record)
    return MountStatus(
        record,
        mounted=where != "absent",
        server_alive=record.server is not None and record.server.alive(),
        attached=all(a.process is None or a.process.alive() for a in record.attachments),
        recorded=recorded,
        hidden_by=hider(record, where),
        record_damaged=not recorded and (Path(record.state_dir) / records.RECORD_NAME).exists(),
    )


def list_mounts() -> list[MountStatus]:
    """Every mount blockstore made here, those whose record is gone too (``umount``
    undoes them all the same). Only root mounts, and its records are root's alone:
    another user would see none and be told there are none."""
    if os.geteuid() != 0:
        raise NotPermitted("listing mounts needs root: run it with sudo")
    found = [status(followed(r)) for r in records.saved()]
    known = {st.record.mountpoint for st in found}
    found += [status(r, recorded=False) for r in _unrecorded_mounts(known)]
    return sorted(found, key=lambda st: st.record.mountpoint)


def other_run_dirs() -> dict[str, int]:
    """Run directories other than this one with mounts standing, and how many: ``mounts``
    lists only this one's, so a mount made with another (a ``sudo`` that dropped
    BLOCKSTORE_RUN_DIR) would otherwise look like none."""
    here = os.path.realpath(records.run_dir())
    found: dict[str, set[str]] = {}
    for run, key in standing_state_dirs():
        if run != here and records.is_private(Path(run, "mounts", key)):
            found.setdefault(run, set()).add(key)
    return {run: len(keys) for run, keys in sorted(found.items())}


def _unrecorded_mounts(known: set[str]) -> list[MountRecord]:
    """The mounts at mount points not in ``known`` whose state directory is there without
    its record (the run directory cleared while they were mounted), as ``unrecorded``
    reads them back."""
    inside = str(records.run_dir() / "mounts") + "/"
    found = []
    for point in syscall.mounted():
        if point in known or point.startswith(inside):
            continue
        if not records.is_private(records.state_dir_for(point)):
            continue
        if (record := unrecorded(point)) is not None:
            found.append(record)
    return found
