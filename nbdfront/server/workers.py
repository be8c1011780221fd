"""The threads of one connection that serve the requests that may wait."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

GIVE_UP_POLL = 0.1


class Workers:
    """The daemon threads of one connection that serve what may wait.

    Threads start as jobs need them, up to ``limit``; a job waits in the
    queue only while every thread is busy. Not a ``ThreadPoolExecutor``:
    its threads are joined, without a bound, when the interpreter exits,
    so one read stuck in a fetch would hold a stopping server past any
    deadline; these are daemons, and stopping waits for them within a bound.
    """

    def __init__(self, name: str, limit: int):
        self._name = name
        self._limit = limit
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job no submit has claimed, less jobs queued
        self._pending = 0  # jobs submitted and not finished
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (not queued) if no thread runs and none can be started
        (the process is out of threads): the caller answers for it."""
        with self._lock:
            if self._idle <= 0 and len(self._threads) < self._limit:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't start new thread"
                    if not self._threads:
                        return False
                    # the running threads take it in turn
                else:
                    self._threads.append(thread)
                    self._idle += 1  # the new thread, waiting for this job
            # A job claims an idle thread, or the next one to finish (below zero: jobs
            # queued behind busy threads), so no thread counts as idle while it works.
            self._idle -= 1
            self._pending += 1
        self._jobs.put(job)
        return True

    def stop(self, give_up: Callable[[], bool] = lambda: False) -> None:
        """Wait for every job, including those jobs submit meanwhile, unless ``give_up()``
        (asked every ``GIVE_UP_POLL`` seconds) says to stop waiting; end the threads."""
        while not self._finished_within(GIVE_UP_POLL) and not give_up():
            pass
        with self._lock:
            threads = len(self._threads)
        for _ in range(threads):
            self._jobs.put(None)

    def _finished_within(self, timeout: float) -> bool:
        """Whether every job is done, waiting ``timeout`` at most for it."""
        with self._lock:
            if self._pending:
                self._done.wait(timeout)
            return not self._pending

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a bug costs its own request, not the thread
                log.exception("internal error in %s", self._name)
            with self._lock:
                self._idle += 1
                self._pending -= 1
                if not self._pending:
                    self._done.notify_all()
