"""What indexing a layer of many small files holds in memory, per entry."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.tar_index_memory import count_entries, gzip_file, index_layer, write_many_entries_tar

ENTRIES = 8_000
PEAK_PER_ENTRY = 650


@pytest.fixture(scope="module")
def many_entries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tar of ``ENTRIES`` small files (with their directories, symlinks, hard links
    and a few xattrs) and its tar.gz beside it."""
    tar = tmp_path_factory.mktemp("many") / "layer.tar"
    write_many_entries_tar(tar, ENTRIES)
    gzip_file(tar, tar.with_suffix(".tar.gz"))
    return tar


def traced_peak(build: Callable[[], object]) -> int:
    """The most memory ``build()`` held at once beyond what was held before, in bytes."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        build()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_indexing_many_small_files_holds_little_per_entry(many_entries: Path, suffix: str):
    """A plain tar (indexed by range reads) and a tar.gz (in one pass) of small files
    are indexed as a server indexes them, under tracemalloc: the most memory the
    indexing held at once, per entry, stays under ``PEAK_PER_ENTRY`` bytes (about 520
    here, a few MiB of buffers included). Before, every header read stayed in
    ``tarfile``'s member list until the walk ended (the tar.gz's until the image was
    written), each inode had a ``__dict__`` and an xattr dict of its own, the writer
    kept an object and the whole path of each inode, and the image was copied once
    whole: about 1,200 bytes per entry (1,700 for the tar.gz), a gigabyte or more
    for a layer of a million files."""
    layer = many_entries.with_suffix(suffix)
    per_entry = traced_peak(lambda: index_layer(layer)) / count_entries(many_entries)
    assert per_entry < PEAK_PER_ENTRY, f"{per_entry:.0f} bytes per entry"
