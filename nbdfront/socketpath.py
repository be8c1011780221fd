"""How long a Unix socket's path may be: what ``serve --unix`` and ``mount`` check first.

Kept apart from the server so that ``mount`` checks it without loading the server.
"""

from __future__ import annotations

import os

SOCKET_PATH_MAX = 107  # bytes of a path in a Unix socket address (sun_path, less its NUL)


def overlong_socket_path(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be named in a Unix socket address (its length and the limit), or
    None: the kernel says only "AF_UNIX path too long", and only once a server binds it."""
    length = len(os.fsencode(path))
    if length <= SOCKET_PATH_MAX:
        return None
    limit = f"over the {SOCKET_PATH_MAX} a Unix socket address holds"
    return f"{os.fspath(path)}: {length} bytes, {limit}"
