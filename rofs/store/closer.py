"""Descriptors closed on threads of their own, not on the request loop.

Closing a file can wait on the disk: ext4 starts writing a file truncated and written
again when it is closed (auto_da_alloc), and the last close of an unlinked file frees
its blocks.  Under another user's heavy writes such a close waited 0.1-0.8 s on the
loop, and every request of every user waited with it.  The daemon's closes of files
written through it and of objects with no name left (the last close frees them) are
handed to `Closer`, whose threads close them while the loop goes on; a RELEASE is
answered at once, as the kernel does not wait for it either.

A descriptor waiting here still counts against the uid that opened it (`pending`), so
a user whose closes are slow cannot hold more descriptors than their share by closing
faster than the disk.  `drain()` waits for every close (unmount).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading

from rofs import crash
from rofs._sys import name_this_thread

log = logging.getLogger(__name__)

CLOSERS = 4  # threads: one slow close leaves the others to the rest
KEPT = -1  # the "uid" of descriptors that count against no one (a node's keep_fd)


class Closer:
    def __init__(self, threads: int = CLOSERS) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: collections.Counter = collections.Counter()
        self._total = 0
        self._idle = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._wanted = threads

    def close(self, fd: int, uid: int) -> None:
        """Close `fd` (opened for `uid`) on a closer thread."""
        if len(self._threads) < self._wanted:
            self._start()
        with self._lock:
            self._pending[uid] += 1
            self._total += 1
        self._queue.put((fd, uid))

    def pending(self, uid: int | None = None) -> int:
        """Descriptors still to close: `uid`'s, or everyone's."""
        with self._lock:
            return self._total if uid is None else self._pending.get(uid, 0)

    def drain(self) -> None:
        """Wait until every descriptor handed over is closed, then stop the threads."""
        with self._lock:
            while self._total:
                self._idle.wait()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="rofs-close-%d" % len(self._threads),
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self) -> None:
        name_this_thread()
        while True:
            job = self._queue.get()
            if job is None:
                return
            fd, uid = job
            try:
                crash.pause("disk:wait")  # (tests only)
                os.close(fd)
            except OSError as e:  # EIO of a late write error: said, not lost
                log.error("closing a descriptor of a file written through the mount: %s",
                          e.strerror)
            finally:
                with self._lock:
                    self._pending[uid] -= 1
                    if not self._pending[uid]:
                        del self._pending[uid]
                    self._total -= 1
                    if not self._total:
                        self._idle.notify_all()
