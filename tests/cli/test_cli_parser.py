"""Usage errors: one line, by the command that got them, pointing at its --help."""

from __future__ import annotations

import subprocess
import sys

import pytest


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("argv", "prog", "said"),
    [
        ([], "blockstore", "the following arguments are required: COMMAND"),
        (["nosuch"], "blockstore", "invalid choice: 'nosuch'"),
        (["--bogus", "mounts"], "blockstore", "unrecognized arguments: --bogus"),
        (["mount", "h/i:v", "/mnt", "--cache-size", "10X"], "blockstore mount", "not a size"),
        (["serve"], "blockstore serve", "required: IMAGE"),
        (["cache"], "blockstore cache", "required: ACTION"),
        (["trace", "import"], "blockstore trace import", "required: FILE"),
        (["prefetch", "h/i:v", "--offline"], "blockstore prefetch", "unrecognized arguments"),
        (["mount", "h/i:v", "/mnt", "-v"], "blockstore mount", "go before the command"),
    ],
)
def test_a_usage_error_is_one_line_naming_its_command(argv, prog, said):
    """No usage block before the error: the line names the command that got the bad
    arguments (a subcommand's unknown option too) and where its usage is, exit 2."""
    shown = blockstore(*argv)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert shown.stderr.startswith(f"{prog}: error: ") and said in shown.stderr
    assert shown.stderr.rstrip().endswith(f"(usage: {prog} --help)")


def test_a_cache_cap_given_to_a_command_that_only_looks_says_why(tmp_path):
    """``cache ls --cache-size`` is refused saying which commands take a cap, and why."""
    shown = blockstore("cache", "ls", "--cache-size", "10G", "--cache-dir", str(tmp_path))
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "cache ls takes no --cache-size" in shown.stderr
    assert "mount, serve, prefetch, index" in shown.stderr and "cache gc" in shown.stderr
