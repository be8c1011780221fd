"""Directories a tar layer only implies keep the attributes of the layer below.

A tar layer holding ``tmp/x`` with no ``tmp/`` entry implies that directory:
extracting it over a lower layer leaves the lower ``tmp`` as it was (1777, its
owner, its xattrs). overlayfs shows a merged directory with the attributes of
its topmost layer instead: the implied one's 0755 and root. Tar layers' images
mark each implied directory ``y`` (and each directory above one ``n``, so that
only those paths are walked here). For each marked directory overlayfs would
show, whose namesake in a layer below is one extraction leaves standing, this
module makes a directory with that one's attributes in a small tree of empty
directories, stacked on top: overlayfs takes the attributes from it and merges
the contents as before.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

# The names the tar layers' images are written with (``stack`` reads the opaque one too).
from blockstore.tarlayer.tree import IMPLIED_XATTR, OPAQUE_XATTR

logger = logging.getLogger(__name__)

PRIVATE_PREFIX = "trusted.overlay."  # overlayfs's own names: never copied


def _xattr(path: str, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:  # no such xattr, or none at all
        return None


def _kind(path: str) -> str | None:
    """ "dir", "other" (a file, a whiteout) or None (nothing there)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a parent is a file
        return None
    return "dir" if stat.S_ISDIR(mode) else "other"


def _ancestors(rel: str) -> list[str]:
    """The proper ancestors of ``rel`` below the root, outermost first."""
    parts = rel.split("/") if rel else []
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _implied(lower: str) -> Iterator[str]:
    """The paths (relative, "" for the root) of ``lower``'s directories marked ``y``."""
    todo = [""]
    while todo:
        rel = todo.pop()
        mark = _xattr(os.path.join(lower, rel), IMPLIED_XATTR)
        if mark is None:
            continue
        if mark == b"y":
            yield rel
        with os.scandir(os.path.join(lower, rel)) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(f"{rel}/{entry.name}" if rel else entry.name)


def _under_no_directory(lower: str, rel: str) -> bool:
    """Whether a parent of ``rel`` in ``lower`` is no directory: ``rel`` is not there, and
    looking it up would follow a symlink of the layer, out of it (an absolute target is
    the machine's). Outermost first, so each one looked at has directories above it."""
    for parent in _ancestors(rel):
        kind = _kind(os.path.join(lower, parent))
        if kind != "dir":
            return kind == "other"
    return False


def _hides_below(lower: str, rel: str) -> bool:
    """Whether ``lower`` hides what the layers below it have at ``rel``: a parent of it
    there that is no directory, or is opaque (the lower contents were removed)."""
    for parent in _ancestors(rel):
        path = os.path.join(lower, parent)
        kind = _kind(path)
        if kind == "other" or (kind == "dir" and _xattr(path, OPAQUE_XATTR) == b"y"):
            return True
        if kind is None:
            return False
    return False


def _shown_from(lowers: list[str], index: int, rel: str) -> bool:
    """Whether overlayfs shows ``rel`` from ``lowers[index]``: no layer above has it,
    or hides it."""
    above = lowers[index + 1 :]
    return not any(_kind(os.path.join(lower, rel)) or _hides_below(lower, rel) for lower in above)


def _source(lowers: list[str], index: int, rel: str) -> str | None:
    """The directory below ``lowers[index]`` whose attributes extraction leaves at
    ``rel``: the first one down that is no implied one, if no layer on the way removed
    it. None: extraction makes the directory afresh (the implied attributes hold)."""
    if _hides_below(lowers[index], rel):
        return None
    for lower in reversed(lowers[:index]):
        if _under_no_directory(lower, rel):
            return None
        path = os.path.join(lower, rel)
        kind = _kind(path)
        if kind == "other":
            return None
        if kind == "dir" and _xattr(path, IMPLIED_XATTR) != b"y":
            return path
        if _hides_below(lower, rel):
            return None
    return None


def _fixes(lowers: list[str]) -> dict[str, str]:
    """Each implied directory overlayfs would show, and the directory whose attributes
    it must show instead."""
    fixes: dict[str, str] = {}
    for index, lower in enumerate(lowers):
        for rel in _implied(lower):
            source = _source(lowers, index, rel)
            if source is not None and _shown_from(lowers, index, rel):
                fixes[rel] = source
    return fixes


def _topmost(lowers: list[str], rel: str) -> str:
    """The directory overlayfs takes ``rel``'s attributes from."""
    for lower in reversed(lowers):
        path = os.path.join(lower, rel)
        if _kind(path) == "dir":
            return path
    raise AssertionError(f"no layer has {rel!r}")


def _copy_attributes(source: str, target: str) -> None:
    """Owner, xattrs (overlayfs's own left out), mode and times of ``source``."""
    st = os.lstat(source)
    os.chown(target, st.st_uid, st.st_gid)
    for name in os.listxattr(source, follow_symlinks=False):
        if name.startswith(PRIVATE_PREFIX):
            continue
        try:
            os.setxattr(target, name, os.getxattr(source, name, follow_symlinks=False))
        except OSError as exc:
            logger.warning("%s: xattr %s not kept on the merged directory: %s", target, name, exc)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def attribute_layer(lowers: list[str], into: Path) -> bool:
    """Make ``into``: the layer to stack over ``lowers`` (bottom first) so that merged
    directories have the attributes extraction gives. False if none needs it (nothing
    is made)."""
    fixes = _fixes(lowers)
    if not fixes:
        return False
    paths = {"", *fixes}
    paths.update(parent for rel in fixes for parent in _ancestors(rel))
    ordered = sorted(paths, key=lambda rel: (rel.count("/") + bool(rel), rel))
    into.mkdir()
    for rel in ordered[1:]:
        (into / rel).mkdir()
    for rel in reversed(ordered):  # children first: making them changes a parent's mtime
        _copy_attributes(fixes.get(rel) or _topmost(lowers, rel), str(into / rel))
    logger.info("%d implied directories keep the attributes of a layer below", len(fixes))
    return True
