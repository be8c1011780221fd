"""Shared CLI pieces: sizes, the cache directory's defaults, one-line errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.cli.common import MAX_SIZE, default_cache_dir, parse_cache_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("1k", 1024), ("512M", 512 << 20), ("10G", 10 << 30), ("20GiB", 20 << 30)],
)
def test_sizes(text: str, expected: int):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "ten", "-5G", "5X", "inf", "1e400", "nan", "-inf"])
def test_bad_sizes_are_refused_with_the_text(text: str):
    """Floats Python parses but no size is (infinity, NaN) too: a usage error, never an
    OverflowError out of argparse."""
    with pytest.raises(argparse.ArgumentTypeError, match="size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from(["", "K", "M", "G", "T"]))
def test_sizes_round_trip_or_refuse_beyond_the_maximum(number: int, unit: str):
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    if number * scale <= MAX_SIZE:
        assert parse_size(f"{number}{unit}") == number * scale
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="too large"):
            parse_size(f"{number}{unit}")


def test_a_fill_rate_under_a_byte_is_refused_not_taken_for_no_cap(tmp_path: Path):
    """Tried: ``serve --fill --fill-rate 0.5`` and ``0.0001K``. Must hold: a usage error
    (exit 2) in one line, before any registry is asked or cache made. Before, the rate
    was rounded down to 0, which means no cap: the slowest fill asked for ran at full
    speed."""
    cache = tmp_path / "c"
    serve = [sys.executable, "-m", "blockstore", "serve", "127.0.0.1:9/x/y:1", "--fill"]
    for rate in ("0.5", "0.0001K"):
        result = subprocess.run(
            [*serve, "--fill-rate", rate, "--cache-dir", str(cache)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "less than one byte" in result.stderr
    assert not cache.exists()


@pytest.mark.parametrize("command", ["serve", "mount"])
def test_a_fill_rate_without_fill_is_refused(tmp_path: Path, command: str):
    """Tried: ``serve`` and ``mount`` with ``--fill-rate 1M`` and no ``--fill``. Must hold:
    exit 2 with one line saying the rate caps a fill not asked for, before any registry
    is asked, cache made or mount attempted. Before, the rate was taken and nothing
    filled: the user who asked for a slow fill had none, and no word of it."""
    cache = tmp_path / "c"
    where = [str(tmp_path / "mnt")] if command == "mount" else []
    argv = [command, "127.0.0.1:9/x/y:1", *where, "--fill-rate", "1M", "--cache-dir", str(cache)]
    result = subprocess.run(
        [sys.executable, "-m", "blockstore", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "blockstore: --fill-rate caps --fill, which is not given: add --fill, or drop it\n"
    )
    assert not cache.exists()


@pytest.mark.parametrize("text", ["0", "1K", "32767"])
def test_a_cache_cap_must_hold_a_chunk(text: str):
    """A cap under one 32 KiB chunk would silently cache nothing: refused, saying why."""
    with pytest.raises(argparse.ArgumentTypeError, match="cannot hold one 32 KiB chunk"):
        parse_cache_size(text)
    assert parse_cache_size("32K") == 32768


def test_cache_dir_precedence(monkeypatch, tmp_path: Path):
    """$BLOCKSTORE_CACHE_DIR wins over $XDG_CACHE_HOME, which wins over ~/.cache."""
    monkeypatch.delenv("BLOCKSTORE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "blockstore"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "blockstore"
    monkeypatch.setenv("BLOCKSTORE_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_a_relative_xdg_cache_home_is_ignored(pushed_images, tmp_path: Path):
    """Tried: ``prefetch`` with ``$XDG_CACHE_HOME`` a relative path (``cache``), run from
    a working directory. Must hold: the path is ignored, as the XDG Base Directory spec
    asks of a relative one, and the cache is made in ~/.cache/blockstore; nothing is made
    in the working directory. Before, each working directory got a cache of its own."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BLOCKSTORE_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME="cache")
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "prefetch", pushed_images.small, "--insecure"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    assert (home / ".cache" / "blockstore" / "data.mdb").is_file()


def test_error_is_one_line_with_its_exit_code(tmp_path: Path):
    """An invalid reference: one line on stderr starting with the program name, exit 2,
    and no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "blockstore", "inspect", "UPPER/Case:tag"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockstore: ")
    assert "Traceback" not in result.stderr
