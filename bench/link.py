"""An emulated network link in front of the registry: delay, a bandwidth cap, counting.

This kernel has no netem, so the link is a TCP proxy. Each direction is one
shared link: a byte leaves when the link is free (a token bucket with no
burst, so bytes are paced at the cap across all connections) and arrives
RTT/2 later. Every system that talks to the registry goes through it, so
registry bytes and HTTP requests are counted the same way for all of them;
the loopback profile is the same proxy with no delay and no cap.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass

PIECE = 256 << 10
"""Most bytes read from a socket at once (fewer, larger pieces cost less Python)."""
PACING_STEP = 0.002
"""Under a cap, a piece is at most this long on the wire, so pacing stays smooth."""
IN_FLIGHT = 64
"""Pieces queued per direction of a connection: more than 20 ms x 1 Gbit/s in flight."""
REQUEST_LINE = re.compile(rb"\n(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")


@dataclass(frozen=True)
class Profile:
    """One link: round-trip time and a bandwidth cap (``None``: uncapped)."""

    name: str
    rtt_ms: float
    mbit: float | None

    @property
    def piece(self) -> int:
        if not self.mbit:
            return PIECE
        return max(4096, min(PIECE, int(self.mbit * 1e6 / 8 * PACING_STEP)))

    @property
    def describe(self) -> str:
        cap = f"{self.mbit:g} Mbit/s" if self.mbit else "no cap"
        return f"{self.rtt_ms:g} ms RTT, {cap}"


LOOPBACK = Profile("loopback", 0.0, None)


def wan(rtt_ms: float, mbit: float) -> Profile:
    rate = f"{mbit / 1000:g}g" if mbit >= 1000 else f"{mbit:g}m"
    return Profile(f"wan-{rtt_ms:g}ms-{rate}", rtt_ms, mbit)


@dataclass(frozen=True)
class Traffic:
    """What crossed the link: bytes each way, HTTP requests, and those for blob bytes."""

    down: int = 0
    up: int = 0
    requests: int = 0
    blob_requests: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.down + other.down,
            self.up + other.up,
            self.requests + other.requests,
            self.blob_requests + other.blob_requests,
        )

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.down - other.down,
            self.up - other.up,
            self.requests - other.requests,
            self.blob_requests - other.blob_requests,
        )


class _Pacer:
    """One direction of the link: when each piece finishes crossing it."""

    def __init__(self) -> None:
        self.free_at = 0.0

    def arrival(self, nbytes: int, profile: Profile) -> float:
        now = time.monotonic()
        if profile.mbit:
            self.free_at = max(now, self.free_at) + nbytes * 8 / (profile.mbit * 1e6)
            now = self.free_at
        return now + profile.rtt_ms / 2000


class _RequestCounter:
    """Counts request lines in one client-to-registry byte stream, across piece borders."""

    def __init__(self) -> None:
        self._carry = b"\n"

    def feed(self, data: bytes) -> tuple[int, int]:
        buffer = self._carry + data
        requests = blobs = 0
        end = 0
        for match in REQUEST_LINE.finditer(buffer):
            requests += 1
            blobs += b"/blobs/" in match.group(2)
            end = match.end()
        self._carry = buffer[max(end - 1, len(buffer) - 4096, 0) :]
        return requests, blobs


class LinkProxy:
    """The proxy: listens on 127.0.0.1, forwards to ``upstream``; ``profile`` may change."""

    def __init__(self, upstream_port: int, profile: Profile = LOOPBACK):
        self.upstream_port = upstream_port
        self.profile = profile
        self._counts = [0, 0, 0, 0]
        self._lock = threading.Lock()
        self._down, self._up = _Pacer(), _Pacer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def traffic(self) -> Traffic:
        with self._lock:
            return Traffic(*self._counts)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        counter = _RequestCounter()
        up: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(IN_FLIGHT)
        down: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(IN_FLIGHT)
        tasks = [
            asyncio.create_task(self._take(client_r, up, self._up, counter)),
            asyncio.create_task(self._deliver(up, upstream_w)),
            asyncio.create_task(self._take(upstream_r, down, self._down, None)),
            asyncio.create_task(self._deliver(down, client_w)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError):
            pass  # one side hung up: the other is closed below
        finally:
            for task in tasks:
                task.cancel()
            for writer in (client_w, upstream_w):
                writer.close()

    async def _take(
        self,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes]],
        pacer: _Pacer,
        counter: _RequestCounter | None,
    ) -> None:
        """Read pieces as they come and stamp each with its arrival time."""
        while data := await reader.read(self.profile.piece):
            self._count(len(data), counter, data)
            await queue.put((pacer.arrival(len(data), self.profile), data))
        await queue.put((0.0, b""))

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        """Write each piece at its arrival time, in order; pass the end on as EOF."""
        while True:
            at, data = await queue.get()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    def _count(self, nbytes: int, counter: _RequestCounter | None, data: bytes) -> None:
        requests, blobs = counter.feed(data) if counter is not None else (0, 0)
        with self._lock:
            if counter is None:
                self._counts[0] += nbytes
            else:
                self._counts[1] += nbytes
                self._counts[2] += requests
                self._counts[3] += blobs
