"""Worker threads shared fairly between the users of a mount.

Offloaded work (a big copy, an fsync) runs on worker threads.  A plain pool is one
queue: one user's 64 big copies would take every worker, and everyone else's work,
root's included, would wait for them all.  A `FairPool` keeps a queue per uid and takes
the next job from each uid in turn, lets no uid other than root run more than `share`
jobs at once, and keeps `reserve` workers that only root's jobs may use, the way the
descriptor budget keeps a reserve for root.  So a user's work waits behind that user's
own, never behind another's, and root's never waits for a worker a user holds.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from rofs._sys import name_this_thread

log = logging.getLogger(__name__)


class FairPool:
    """`workers` threads (started as work arrives) running `submit`ted jobs: a queue
    per uid, served in turn; at most `share` jobs of one uid other than root running,
    and `reserve` of the workers for root's jobs only."""

    def __init__(self, workers: int, name: str, *, reserve: int, share: int) -> None:
        if not 0 <= reserve < workers or share < 1:
            raise ValueError("a FairPool needs 0 <= reserve < workers and share >= 1")
        self.workers, self.name, self.reserve, self.share = workers, name, reserve, share
        self._cond = threading.Condition(threading.Lock())
        self._queues: dict[int, collections.deque] = {}  # uid -> its jobs, in order
        self._turn: collections.deque[int] = collections.deque()  # uids with jobs waiting
        self._running: collections.Counter[int] = collections.Counter()
        self._busy = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._stop = False

    def submit(self, uid: int, fn: Callable, args: tuple,
               done: Callable[[object, BaseException | None], None]) -> None:
        """Run fn(*args) for uid on a worker; then done(result, exception) there."""
        with self._cond:
            if self._stop:
                raise RuntimeError("%s: shut down" % self.name)
            queue = self._queues.get(uid)
            if queue is None:
                queue = self._queues[uid] = collections.deque()
                self._turn.append(uid)
            queue.append((fn, args, done))
            if self._idle:
                self._wake_one()
            elif len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name="%s-%d" % (self.name, len(self._threads)))
                self._threads.append(thread)
                thread.start()

    def _wake_one(self) -> None:
        """Wake one idle worker (under the lock).  The waker counts it as no longer
        idle, so two wakes never fall on one worker while another sleeps on."""
        self._idle -= 1
        self._cond.notify()

    def _may_run(self, uid: int) -> bool:
        if uid == 0:
            return True
        others = self._busy - self._running[0]
        return others < self.workers - self.reserve and self._running[uid] < self.share

    def _next(self) -> tuple[int, tuple] | None:
        """The next job some uid may run now, each uid in turn (under the lock)."""
        for _ in range(len(self._turn)):
            uid = self._turn[0]
            self._turn.rotate(-1)
            if self._may_run(uid):
                queue = self._queues[uid]
                job = queue.popleft()
                if not queue:
                    del self._queues[uid]
                    self._turn.remove(uid)
                return uid, job
        return None

    def _work(self) -> None:
        name_this_thread()
        while True:
            with self._cond:
                while (taken := self._next()) is None:
                    if self._stop:
                        return
                    self._idle += 1
                    self._cond.wait()
                uid, (fn, args, done) = taken
                self._running[uid] += 1
                self._busy += 1
            try:
                result, error = fn(*args), None
            except BaseException as e:
                result, error = None, e
            try:
                done(result, error)
            except Exception:  # a bug in the caller's callback: the worker goes on
                log.exception("%s: a job's completion failed", self.name)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._running[uid] -= 1
                    if not self._running[uid]:
                        del self._running[uid]
                    if self._idle and self._turn:
                        self._wake_one()  # a uid held back may run now

    def shutdown(self) -> None:
        """Run what is queued, then stop every worker and wait for them."""
        with self._cond:
            self._stop = True
            self._idle = 0
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
