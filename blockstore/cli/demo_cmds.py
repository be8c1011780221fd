"""``blockstore demo``: see the whole product work with one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from blockstore.demo import DEFAULT_SOURCES, Demo


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the whole job end to end on this machine (needs root and FUSE)",
        description="Start a local registry, build and push an EROFS image of a real tree, "
        "mount it lazily, fill the cache, stop the registry, mount again offline and check "
        "every file. The same tree, pushed as an ordinary tar.gz image, is mounted with no "
        "conversion, prefetched, and mounted offline and checked too. Cleans up after itself.",
    )
    demo.add_argument(
        "--source",
        type=_source_dir,
        action="append",
        default=None,
        metavar="DIR",
        help="a tree to put in the image, but for its FIFOs, sockets and devices "
        "(repeatable; default: " + ", ".join(str(p) for p in DEFAULT_SOURCES) + ")",
    )
    demo.add_argument("--keep", action="store_true", help="keep the working directory")
    demo.set_defaults(func=run_demo)


def _source_dir(text: str) -> Path:
    """A tree to copy: checked as the options are read, not once the demo has begun."""
    path = Path(text)
    if not path.is_dir():
        why = "not a directory" if path.exists() else "no such directory"
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return path


def run_demo(args: argparse.Namespace) -> int:
    sources = args.source or [p for p in DEFAULT_SOURCES if p.is_dir()]
    return Demo(sources, keep=args.keep).run()
