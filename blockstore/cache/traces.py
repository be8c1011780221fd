"""Access traces kept in the cache, one per layer digest, for replay on a cold open."""

from __future__ import annotations

import json
import logging

from blockstore.errors import CacheError
from blockstore.prefetch.trace import Trace

from .layout import DB_TRACES
from .store import ChunkStore

log = logging.getLogger(__name__)


class TraceShelf:
    """The traces of one cache directory: put, get, list, remove."""

    def __init__(self, store: ChunkStore):
        self._env = store.env

    def put(self, trace: Trace) -> None:
        raw = json.dumps(trace.to_record(), separators=(",", ":")).encode()
        key = trace.digest.encode()
        self._env.write(lambda txn: txn.put(key, raw, db=self._env.dbs[DB_TRACES]))

    def get(self, digest: str) -> Trace | None:
        with self._env.reader(DB_TRACES) as txn:
            raw = txn.get(digest.encode())
            raw = bytes(raw) if raw is not None else None
        return self._parse(digest, raw) if raw is not None else None

    def all(self) -> list[Trace]:
        """Every readable trace; each unreadable one is named in a warning and skipped, so
        one bad record does not hide the others."""
        with self._env.reader(DB_TRACES) as txn:
            items = [(bytes(key).decode(), bytes(raw)) for key, raw in txn.cursor()]
        traces = []
        for digest, raw in items:
            try:
                traces.append(self._parse(digest, raw))
            except CacheError as exc:
                log.warning("%s", exc)
        return traces

    def remove(self, digest: str) -> bool:
        return self._env.write(lambda txn: txn.delete(digest.encode(), db=self._env.dbs[DB_TRACES]))

    @staticmethod
    def _parse(digest: str, raw: bytes) -> Trace:
        try:
            return Trace.from_record(json.loads(raw))
        except ValueError as exc:
            raise CacheError(f"the kept trace of {digest} is unreadable: {exc}") from exc
