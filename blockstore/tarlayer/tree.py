"""The filesystem tree a tar layer describes, as tar extraction would leave it.

A tar stream is a log, not a tree: a path may appear several times (the last
entry wins, as when extracting), a hard link names a file written earlier,
parent directories may be missing, a symlink written earlier may lie on a
path (extraction writes through it; here it is resolved within the layer), and
OCI whiteouts (``.wh.NAME``,
``.wh..wh..opq``) are instructions for the layers below. ``build_tree`` replays
that log into inodes and directories once, so the image writer only has to lay
out a finished tree, and a test can compare two trees.

Whiteouts become what overlayfs understands: a 0/0 character device in place
of ``.wh.NAME``, and ``trusted.overlay.opaque=y`` on a directory that held
``.wh..wh..opq``. A directory holding a whiteout also gets an empty
``trusted.overlay.origin``, so overlayfs filters its listing even when no lower
layer has that directory (otherwise it lists such a directory directly and the
whiteouts would show).

A whiteout acts on the layers below only (the OCI image spec): a path this
layer wrote before its ``.wh.`` entry stays. Where the lower path is gone but
this layer puts a directory there (after a whiteout, or in place of a file of
its own), that directory is opaque, so nothing of a lower directory of that
name shows through, as extracting the layers in order would leave it. A
directory the layer only implies, to hold whiteouts of what lay under a path
it also whites out, is no directory of the layer's: it stays a whiteout.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from blockstore.errors import BlockstoreError
from blockstore.tarlayer import posix_acl as acl

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."  # AUFS's own names at a layer's root, the opaque marker aside
AUFS_LINK_DIR = b".wh..wh.plnk"  # where AUFS keeps files hard-linked across its branches
OPAQUE_XATTR = b"trusted.overlay.opaque"
ORIGIN_XATTR = b"trusted.overlay.origin"
IMPLIED_XATTR = b"trusted.overlay.blockstore.implied"
ACL_ACCESS_XATTR = b"system.posix_acl_access"
SYMLINK_FOLLOWS = 40  # symlinks one path may pass through, as Linux allows (MAXSYMLINKS)
NAMES_WALKED = 4096
"""Names one path may walk, its symlinks' included. Linux allows 40 targets of 4 KiB,
80,000 names, cheap in the kernel; here each costs a Python call, so a layer of small
entries through such chains took 14 ms an entry: a million of them, which gzip
makes a few MB, hours.
An entry's own path, within PATH_MAX as extraction needs, walks 2,048 names at most."""
MAX_XATTR_BYTES = 256 << 20
"""Bytes of distinct xattr names and values a layer may hold, each held once however
many files carry it (a layer labels many files alike). Compressible values (64 KB of
one letter) gzip to a few hundred bytes: without a bound, a layer of a few MB held
GBs while indexed."""
MAX_ENTRIES = 10_000_000
"""Tar entries a layer may hold, the directories they imply counted. Indexing holds
some 500 bytes for each (its inode and name, then its place in the image, and the
image), about 675 for a directory a path implies: ten million take 5 to 7 GB.
Gzip makes an empty file's header some 30 bytes, so 1.5 GB of layer could hold 50
million of them: such a layer is refused as it passes the count, before memory runs
out. One entry's path may imply 4,096 directories (``x1/a/a/.../f``): 200 such
entries, 7 KB of gzip, held 540 MB."""
MAX_NAMES_WALKED = 1 << 30
"""Names a layer's paths may walk in all. Each costs some 0.25 µs, and gzip makes an
entry 2,000 names deep 16 bytes: ten million entries 4,096 names deep (the most
``MAX_ENTRIES`` and ``NAMES_WALKED`` let through, 160 MB of gzip) would walk 4 * 10^10,
three hours. A billion, some five minutes, is 100 names an entry for ten million
entries, far deeper than layers go."""
NUMBERS_SHARED = 1 << 16
"""Distinct modes, owners and mtimes whose int objects a layer's inodes share."""


class TarLayerError(BlockstoreError):
    """A tar layer holds something a filesystem image cannot represent."""

    exit_code = 6


class DamagedTar(TarLayerError):
    """The tar stream itself does not parse (a header's checksum, the format): its bytes
    may have been spoilt on the way, where an entry refused for what it holds was
    read from a header whose checksum held."""


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member of a tar stream, with the byte offset of its data."""

    path: bytes
    mode: int  # full st_mode: file type and permission bits
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_ns: int = 0  # nanoseconds part, from a PAX mtime
    size: int = 0
    data_offset: int = 0  # where the file's bytes start in the uncompressed tar
    link: bytes = b""  # symlink target, or the hard-link target's path
    hardlink: bool = False
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})
"""The xattrs of an inode that has none: one mapping for them all (a layer has a
million files, few with xattrs)."""


@dataclass(eq=False, slots=True)
class Inode:
    """A file, directory, symlink or device node: what a dirent points at. Slotted:
    a layer may hold millions, and a ``__dict__`` each doubled their size."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_ns: int = 0
    size: int = 0
    data_offset: int = 0
    target: bytes = b""  # symlink target
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: NO_XATTRS)
    children: dict[bytes, Inode] | None = None  # directories only
    implied: bool = False  # a directory made for a path under it, with no entry of its own
    hides_lower: bool = False  # a directory whose lower namesake this layer whites out

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_whiteout(self) -> bool:
        """What overlayfs takes for a whiteout: a 0/0 character device."""
        return stat.S_ISCHR(self.mode) and self.rdev_major == self.rdev_minor == 0

    def set_xattr(self, name: bytes, value: bytes) -> None:
        """Set one xattr, in a mapping of this inode's own (never in ``NO_XATTRS``)."""
        self.xattrs = {**self.xattrs, name: value}


def new_directory(mode: int = 0o755) -> Inode:
    return Inode(mode=stat.S_IFDIR | (mode & 0o7777), children={})


def split_path(raw: bytes, link_of: bytes = b"") -> list[bytes]:
    """Path components of a tar member name, or an error for unsafe names.

    ``./a//b/`` is ``a/b``; ``/a`` is ``a`` (tar strips leading slashes too);
    ``..`` could point outside the layer, so it is refused, as is a NUL byte. A
    whiteout's name is held to 255 bytes after ``.wh.``: the name it hides is the one
    stored, and Docker and containerd write ``.wh.`` before a name of 255 bytes all the
    same. ``link_of``: the entry ``raw`` is the hard link target of, for messages.
    """
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    why = _why_unsafe(raw, parts)
    if why is not None:
        where = f"tar entry {show_path(link_of or raw)}"
        if link_of:
            where += f": hard link to {show_path(raw)}"
        raise TarLayerError(f"{where}: {why}")
    return parts


def _why_unsafe(raw: bytes, parts: list[bytes]) -> str | None:
    if b"\0" in raw:  # a PAX record can hold one; no path the kernel takes can
        return "a NUL byte in a path is not allowed"
    if b".." in parts:
        return "'..' in a path is not allowed"
    *leading, last = parts or [b""]
    last = last.removeprefix(WHITEOUT_PREFIX)
    if len(last) > 255 or max(map(len, leading), default=0) > 255:
        return "a name is longer than 255 bytes"
    return None


SHOWN_PATH_MAX = 4096
"""The most bytes of a path a message shows: a PAX record may name an entry with a
MiB of path, which a message showed whole."""


def show_path(raw: bytes) -> str:
    """A path for a message: whole up to PATH_MAX, its start beyond."""
    if len(raw) <= SHOWN_PATH_MAX:
        return repr(raw.decode("utf-8", "backslashreplace"))
    start = raw[:SHOWN_PATH_MAX].decode("utf-8", "backslashreplace")
    return f"{start!r}... ({len(raw):,} bytes)"


class LayerTree:
    """The root directory of one layer, built by replaying its tar entries."""

    def __init__(self) -> None:
        self.root = new_directory()
        self.root.implied = True  # until a ``./`` entry says what it is
        self._aufs_links: dict[bytes, Inode] = {}  # files of ``.wh..wh.plnk``, by name
        self._xattr_data: dict[bytes, bytes] = {}  # each distinct xattr name and value
        self._xattr_bytes = 0
        self._numbers: dict[int, int] = {}  # the int object shared for each number
        self._entries = 0
        self._names_walked = 0

    def _shared(self, number: int) -> int:
        """``number`` as one int object for every inode that carries it: each header
        parsed gave its own, 32 bytes an inode for each of its mode, owner, group and
        mtime, where a layer's files share a few of each (up to ``NUMBERS_SHARED``)."""
        kept = self._numbers.get(number)
        if kept is not None:
            return kept
        if len(self._numbers) < NUMBERS_SHARED:
            self._numbers[number] = number
        return number

    def lookup(self, parts: list[bytes]) -> Inode | None:
        node = self.root
        for p in parts:
            if node.children is None:
                return None
            child = node.children.get(p)
            if child is None:
                return None
            node = child
        return node

    def _parent(self, parts: list[bytes], raw: bytes) -> Inode:
        """The directory that holds ``parts[-1]``, creating missing ones as tar does, and
        writing through a symlink of this layer on the way, as extraction does."""
        trail = self._directories_on(parts[:-1])
        budget = [SYMLINK_FOLLOWS, NAMES_WALKED - (len(trail) - 1)]
        for p in parts[len(trail) - 1 : -1]:
            trail = self._step(trail, p, raw, budget)
        self._walked(NAMES_WALKED - budget[1], raw)
        return trail[-1]

    def _walked(self, names: int, raw: bytes) -> None:
        """Count the names one entry's path walked, refused past ``MAX_NAMES_WALKED``."""
        self._names_walked += names
        if self._names_walked > MAX_NAMES_WALKED:
            raise TarLayerError(
                f"tar entry {show_path(raw)}: the layer's paths walk more than"
                f" {MAX_NAMES_WALKED:,} names in all, more than is indexed (a layer of"
                " entries thousands of names deep)"
            )

    def _directories_on(self, names: list[bytes]) -> list[Inode]:
        """The root and the directories ``names`` lead through while each is one already:
        the way most entries' parents are found, a dict lookup a name (a path 2,000
        names deep, walked a step at a time, cost 2 ms an entry, 16 bytes of gzip)."""
        trail = [self.root]
        for name in names[:NAMES_WALKED]:
            child = (trail[-1].children or {}).get(name)
            if child is None or child.children is None:
                break
            trail.append(child)
        return trail

    def _step(self, trail: list[Inode], name: bytes, raw: bytes, budget: list[int]) -> list[Inode]:
        """``trail`` (the directories from the root) gone on to ``name``. A symlink is
        followed within the layer: an absolute target starts at its root, and ``..``
        stops there, as container runtimes resolve them, so nothing leads out of it;
        ``budget``: how many more symlinks (Linux's 40) and names this lookup may take."""
        budget[1] -= 1
        if budget[1] < 0:
            through = " through symlinks" if budget[0] < SYMLINK_FOLLOWS else ""
            raise TarLayerError(
                f"tar entry {show_path(raw)}: its path walks more than {NAMES_WALKED}"
                f" names{through}"
            )
        if name == b"..":  # only in a symlink's target: split_path refuses it in a name
            if len(trail) > 1:
                trail.pop()
            return trail
        node = trail[-1]
        assert node.children is not None
        child = node.children.get(name)
        if child is None:
            child = node.children[name] = self._implied_directory(raw)
        elif child.is_whiteout:  # removed below, made again here: nothing shows through
            child = node.children[name] = self._implied_directory(raw)
            child.set_xattr(OPAQUE_XATTR, b"y")
            child.hides_lower = True
        elif stat.S_ISLNK(child.mode):
            budget[0] -= 1
            if budget[0] < 0:
                raise TarLayerError(f"tar entry {show_path(raw)}: too many symlinks on its path")
            parts = [part for part in child.target.split(b"/") if part not in (b"", b".")]
            if any(len(part) > 255 for part in parts):
                # Linux fails such a path (ENAMETOOLONG); made here, the name would be
                # one no EROFS directory can hold.
                raise TarLayerError(
                    f"tar entry {show_path(raw)}: its path through symlink {show_path(name)}"
                    " has a name longer than 255 bytes"
                )
            if child.target.startswith(b"/"):
                trail = [self.root]
            for part in parts:
                trail = self._step(trail, part, raw, budget)
            return trail
        elif not child.is_dir:
            raise TarLayerError(f"tar entry {show_path(raw)}: {show_path(name)} is not a directory")
        trail.append(child)
        return trail

    def _linked(self, link: bytes, raw: bytes) -> Inode | None:
        """What a hard link names: its last component itself, the directories before it
        through the layer's symlinks, as link(2) takes them (or a file AUFS kept aside in
        ``.wh..wh.plnk``). (A directory missing on the way is made, but the layer is
        refused then: the link names nothing.)"""
        parts = split_path(link, link_of=raw)
        if not parts:
            return None
        if parts[0] == AUFS_LINK_DIR:
            return self._aufs_links.get(parts[1]) if len(parts) == 2 else None
        parent = self._parent(parts, raw)
        assert parent.children is not None
        return parent.children.get(parts[-1])

    def _count(self, entry: TarEntry) -> None:
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise TarLayerError(
                f"tar entry {show_path(entry.path)} is entry {self._entries:,} of the layer (the"
                " directories entries imply counted): a layer of more than"
                f" {MAX_ENTRIES:,} entries is not indexed (each is held in memory while the"
                " layer is indexed)"
            )

    def _implied_directory(self, raw: bytes) -> Inode:
        """A directory made for a path, counted as an entry: memory is held for it alike."""
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise TarLayerError(
                f"tar entry {show_path(raw)}: the directories its path implies take the layer"
                f" past {MAX_ENTRIES:,} entries, which is more than is indexed (each is held"
                " in memory while the layer is indexed)"
            )
        directory = new_directory()
        directory.implied = True
        return directory

    def _with_xattrs_held_once(self, entry: TarEntry) -> TarEntry:
        """``entry`` with the xattr names and values earlier entries carried taken from
        them, one copy each; refused once the distinct ones pass ``MAX_XATTR_BYTES``."""
        if not entry.xattrs:
            return entry
        held = tuple(
            (self._held_once(name, entry), self._held_once(value, entry))
            for name, value in entry.xattrs
        )
        return replace(entry, xattrs=held)

    def _held_once(self, data: bytes, entry: TarEntry) -> bytes:
        kept = self._xattr_data.get(data)
        if kept is not None:
            return kept
        self._xattr_bytes += len(data)
        if self._xattr_bytes > MAX_XATTR_BYTES:
            raise TarLayerError(
                f"tar entry {show_path(entry.path)}: the layer's xattrs pass "
                f"{MAX_XATTR_BYTES >> 20} MiB of distinct names and values"
            )
        self._xattr_data[data] = data
        return data

    def add(self, entry: TarEntry) -> None:
        """Apply one tar entry: later entries for a path replace earlier ones."""
        self._count(entry)
        entry = self._with_xattrs_held_once(entry)
        parts = split_path(entry.path)
        if not parts:
            if not stat.S_ISDIR(entry.mode) or entry.hardlink:
                raise TarLayerError(
                    f"tar entry {show_path(entry.path)}: the root must be a directory"
                )
            _update_dir(self.root, entry)
            return
        if parts[0].startswith(AUFS_META_PREFIX) and parts != [OPAQUE_MARKER]:
            self._aufs_meta(parts, entry)
            return
        parent = self._parent(parts, entry.path)
        assert parent.children is not None
        name = parts[-1]
        if name == OPAQUE_MARKER:
            parent.set_xattr(OPAQUE_XATTR, b"y")
            return
        if name.startswith(WHITEOUT_PREFIX):
            hidden = name[len(WHITEOUT_PREFIX) :]
            if not hidden:
                raise TarLayerError(f"tar entry {show_path(entry.path)}: a whiteout with no name")
            if hidden in (b".", b".."):  # kept, the kernel would list it as a second one
                raise TarLayerError(
                    f"tar entry {show_path(entry.path)}: a whiteout of {show_path(hidden)}, "
                    "which is no entry of the directory"
                )
            written = parent.children.get(hidden)
            if written is not None and not written.is_whiteout:
                # This layer's own path stays; the lower one it already hides is gone.
                if written.is_dir:
                    written.set_xattr(OPAQUE_XATTR, b"y")
                    written.hides_lower = True
                return
            parent.children[hidden] = Inode(
                mode=stat.S_IFCHR, uid=entry.uid, gid=entry.gid, mtime=entry.mtime
            )
            parent.set_xattr(ORIGIN_XATTR, b"")
            return
        if entry.hardlink:
            target = self._linked(entry.link, entry.path)
            if target is None or target.is_dir or target.is_whiteout:
                raise TarLayerError(
                    f"tar entry {show_path(entry.path)}: hard link to {show_path(entry.link)},"
                    " which is not a file written earlier"
                )
            parent.children[name] = target
            return
        existing = parent.children.get(name)
        if existing is not None and existing.is_dir and stat.S_ISDIR(entry.mode):
            _update_dir(existing, entry)  # tar keeps a directory's contents
            return
        node = _inode_of(entry, self._shared)
        if existing is not None and node.is_dir:
            # In place of a whiteout or of a file of this layer: the lower path is gone.
            node.set_xattr(OPAQUE_XATTR, b"y")
        parent.children[name] = node

    def _aufs_meta(self, parts: list[bytes], entry: TarEntry) -> None:
        """Layers Docker's aufs driver wrote hold AUFS's own files at their root
        (``.wh..wh.aufs``, ``.wh..wh.orph/``, ``.wh..wh.plnk/``): no paths of the image,
        which Docker and podman skip as they extract. A file of ``.wh..wh.plnk`` is kept
        aside, as the target of the layer's hard links to it."""
        is_file = stat.S_ISREG(entry.mode) and not entry.hardlink
        if len(parts) == 2 and parts[0] == AUFS_LINK_DIR and is_file:
            self._aufs_links[parts[1]] = _inode_of(entry, self._shared)


def _update_dir(node: Inode, entry: TarEntry) -> None:
    node.implied = False
    node.mode = stat.S_IFDIR | stat.S_IMODE(entry.mode)
    node.uid, node.gid = entry.uid, entry.gid
    node.mtime, node.mtime_ns = entry.mtime, entry.mtime_ns
    # Extraction sets the entry's xattrs on the directory already there and removes none
    # (GNU tar, containerd): those it had stay, and the markers whiteouts in it set win.
    kept = {k: v for k, v in node.xattrs.items() if k in (OPAQUE_XATTR, ORIGIN_XATTR)}
    xattrs = dict(node.xattrs) | dict(entry.xattrs) | kept
    access = xattrs.get(ACL_ACCESS_XATTR)
    if access is not None and all(name != ACL_ACCESS_XATTR for name, _ in entry.xattrs):
        xattrs[ACL_ACCESS_XATTR] = _chmod_acl(access, entry.mode)
    node.xattrs = xattrs


def _chmod_acl(value: bytes, mode: int) -> bytes:
    """An access ACL as chmod(2) to ``mode`` leaves it: the owner, other and group
    entries (the mask, if there is one) take its bits. Extraction chmods a directory
    listed again, and the kernel rewrites the ACL that an earlier entry set."""
    entries = acl.entries_of(value)
    if entries is None:
        return value  # no ACL the kernel would take: kept as it came
    group = acl.MASK if any(tag == acl.MASK for tag, _, _ in entries) else acl.GROUP_OBJ
    bits = {acl.USER_OBJ: mode >> 6 & 7, group: mode >> 3 & 7, acl.OTHER: mode & 7}
    return acl.packed((tag, bits.get(tag, perm), qualifier) for tag, perm, qualifier in entries)


def _xattrs_extraction_sets(
    xattrs: tuple[tuple[bytes, bytes], ...], kind: int
) -> Mapping[bytes, bytes]:
    """The xattrs extraction sets on a new inode of ``kind``: Linux refuses ``user.*``
    ones on all but files and directories (EPERM, xattr(7)), which tar and containerd
    pass over, leaving a symlink, fifo or device without them."""
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        xattrs = tuple((name, value) for name, value in xattrs if not name.startswith(b"user."))
    return dict(xattrs) if xattrs else NO_XATTRS


def _inode_of(entry: TarEntry, shared: Callable[[int], int]) -> Inode:
    kind = stat.S_IFMT(entry.mode)
    if kind not in (
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
    ):
        raise TarLayerError(f"tar entry {show_path(entry.path)}: unsupported file type {kind:o}")
    node = Inode(
        mode=shared(entry.mode),
        uid=shared(entry.uid),
        gid=shared(entry.gid),
        mtime=shared(entry.mtime),
        mtime_ns=entry.mtime_ns,
        xattrs=_xattrs_extraction_sets(entry.xattrs, kind),
    )
    if kind == stat.S_IFREG:
        node.size, node.data_offset = entry.size, entry.data_offset
    elif kind == stat.S_IFLNK:
        if not entry.link:
            raise TarLayerError(f"tar entry {show_path(entry.path)}: a symlink with no target")
        if b"\0" in entry.link:  # followed, it would end at the NUL
            raise TarLayerError(f"tar entry {show_path(entry.path)}: a NUL byte in its target")
        node.target = entry.link
        node.size = len(entry.link)
        # Linux makes every symlink 0777 whatever the header says, as extraction shows.
        node.mode = stat.S_IFLNK | 0o777
    elif kind == stat.S_IFDIR:
        node.children = {}
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev_major, node.rdev_minor = entry.rdev_major, entry.rdev_minor
    return node


def _directories(top: Inode) -> Iterator[Inode]:
    """``top`` and every directory under it, parents before children. Iterative: a
    layer may nest directories a thousand deep (``a/a/...`` is 2 KiB), past Python's
    recursion limit."""
    todo = [top]
    while todo:
        directory = todo.pop()
        assert directory.children is not None
        yield directory
        todo.extend(child for child in directory.children.values() if child.is_dir)


def _holds_nothing_written(node: Inode) -> bool:
    """An implied directory with nothing of the layer's own under it: whiteouts (and
    opaque markers) at most, in directories as implied."""
    for directory in _directories(node):
        assert directory.children is not None
        if not directory.implied or not all(
            child.is_whiteout or child.is_dir for child in directory.children.values()
        ):
            return False
    return True


def _whiteouts_for_gone_directories(root: Inode) -> None:
    """A directory the layer only implied, to hold whiteouts under a path it whites out
    as well, is no directory of the layer's: extraction deletes the lower one and writes
    nothing there. It goes back to being a whiteout."""
    for directory in _directories(root):
        assert directory.children is not None
        for name, child in directory.children.items():
            if child.is_dir and child.hides_lower and _holds_nothing_written(child):
                directory.children[name] = Inode(mode=stat.S_IFCHR)
                directory.set_xattr(ORIGIN_XATTR, b"")


def _mark_implied(root: Inode) -> None:
    """Mark the directories the layer only implies (``y``) and those above one (``n``),
    so that a mount finds them without walking the whole tree. One made again after
    its whiteout (``hides_lower``) replaces the lower one, whose attributes are gone."""
    directories = list(_directories(root))
    marked: set[int] = set()
    for directory in reversed(directories):  # children before their parents
        assert directory.children is not None
        implied = directory.implied and not directory.hides_lower
        if implied or any(id(child) in marked for child in directory.children.values()):
            directory.set_xattr(IMPLIED_XATTR, b"y" if implied else b"n")
            marked.add(id(directory))


def build_tree(entries: Iterable[TarEntry]) -> LayerTree:
    """Replay tar entries in order into the tree that extraction would give."""
    tree = LayerTree()
    for entry in entries:
        tree.add(entry)
    _whiteouts_for_gone_directories(tree.root)
    _mark_implied(tree.root)
    return tree
