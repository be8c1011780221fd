"""Reply bytes onto a socket: scatter-gather sends with no joining copy.

A reply is a list of buffers (a header and views into the cache); these
helpers send such lists whole, or resume them where a short send stopped,
walking each list once however many buffers it has.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence

from blockstore.export import Buffer
from nbdfront.tls import TLSStream

IOV_MAX = 1024
"""Buffers one ``sendmsg`` takes (the kernel's ``UIO_MAXIOV``)."""


def send_buffers(sock: socket.socket | TLSStream, buffers: Sequence[Buffer]) -> None:
    """Send every byte of ``buffers`` with scatter-gather writes, no joining copy. More
    buffers than one ``sendmsg`` takes go in windows of that many, each walked once."""
    for start in range(0, len(buffers), IOV_MAX):
        window = buffers[start : start + IOV_MAX]
        sent = sock.sendmsg(window)
        if sent == buffers_length(window):
            continue  # the usual case: one call, no views made
        rest = advance(window, sent)
        first = 0
        while first < len(rest):
            first = skip_sent(rest, first, sock.sendmsg(rest[first:]))


def steps(buffers: Sequence[Buffer], size: int) -> Iterator[list[Buffer]]:
    """``buffers`` in groups of about ``size`` bytes, a longer buffer cut into views."""
    step: list[Buffer] = []
    room = size
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while view.nbytes > room:
            step.append(view[:room])
            yield step
            view, step, room = view[room:], [], size
        if view.nbytes:
            step.append(view)
            room -= view.nbytes
    if step:
        yield step


def advance(buffers: Sequence[Buffer], sent: int) -> list[memoryview]:
    """What is left of ``buffers`` once ``sent`` bytes went out, as byte views."""
    rest: list[memoryview] = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        size = view.nbytes
        if sent >= size:
            sent -= size
            continue
        rest.append(view[sent:] if sent else view)
        sent = 0
    return rest


def skip_sent(views: list[memoryview], first: int, sent: int) -> int:
    """The index of the first view not wholly sent once ``sent`` more bytes from
    ``views[first]`` on went out; a view sent in part is cut down in place. Walking
    an index, not rebuilding the list, keeps a long batch linear in its length."""
    while sent and first < len(views):
        size = views[first].nbytes
        if sent < size:
            views[first] = views[first][sent:]
            return first
        sent -= size
        first += 1
    while first < len(views) and not views[first].nbytes:
        first += 1
    return first


def buffers_length(buffers: Sequence[Buffer]) -> int:
    """Bytes in ``buffers``, whatever their item size."""
    if len(buffers) == 1 and type(buffers[0]) is bytes:
        return len(buffers[0])  # a hit in one chunk
    total = 0
    for b in buffers:
        total += len(b) if type(b) is bytes else memoryview(b).nbytes
    return total


def shutdown_quietly(sock: socket.socket | TLSStream, how: int) -> None:
    """``shutdown`` that ignores a socket the peer already closed."""
    with contextlib.suppress(OSError):
        sock.shutdown(how)
