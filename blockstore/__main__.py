"""The ``blockstore`` command's entry point (the console script and ``python -m blockstore``).

A Ctrl-C while Python loads the command's modules, before ``main`` can catch
it, would print a KeyboardInterrupt traceback; here it ends the command as an
interrupt anywhere later does: one line, exit code 130.
"""

import signal
import sys


def _interrupted(_signum: int, _frame: object) -> None:
    print("blockstore: interrupted", file=sys.stderr)
    raise SystemExit(130)


def run() -> int:
    """Load the command and run it; a SIGINT the command was started ignoring stays so."""
    quiet = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if quiet:
        signal.signal(signal.SIGINT, _interrupted)
    from blockstore.cli import main

    if quiet:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return main()


if __name__ == "__main__":
    sys.exit(run())
