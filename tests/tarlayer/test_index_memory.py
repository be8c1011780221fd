"""What indexing a layer of many small files holds in memory, per entry."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.tar_index_memory import count_entries, gzip_file, index_layer, write_many_entries_tar
from blockstore.tarlayer import tree
from blockstore.tarlayer.tarwalk import walk_tar
from blockstore.tarlayer.tree import TarLayerError, build_tree

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


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_layer_of_more_entries_than_taken_is_refused_as_it_passes_the_count(
    many_entries: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
):
    """The same layers (some 8,300 entries) indexed with the most entries taken set to
    1,000 (``MAX_ENTRIES``, ten million): refused at entry 1,001, naming that count and
    the limit, no entry after it read; with the limit at their count, indexed. Before,
    every entry was held however many there were: a layer of 50 million empty files,
    1.5 GB of gzip, would have held some 25 GB before the machine ran out."""
    monkeypatch.setattr(tree, "MAX_ENTRIES", 1_000, raising=False)
    layer = many_entries.with_suffix(suffix)
    with pytest.raises(TarLayerError, match=r"is entry 1,001 .* more than 1,000 entries"):
        index_layer(layer)
    read: list[object] = []
    with many_entries.open("rb") as tar, pytest.raises(TarLayerError):
        build_tree(read.append(entry) or entry for entry in walk_tar(tar))
    assert len(read) == 1_001
    monkeypatch.setattr(tree, "MAX_ENTRIES", count_entries(many_entries))
    index_layer(layer)
