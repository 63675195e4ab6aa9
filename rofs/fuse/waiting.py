"""Requests read from /dev/fuse and not served yet, served with the uids taking turns.

The request loop (rofs.fuse.session) reads the requests waiting before it serves each
one, READ_AHEAD at most, and serves the next by turns: a user's queue of requests
delays another uid's (root's) by one of its own, never by all of them.
"""

from __future__ import annotations

import collections
import mmap
import struct

# Requests read ahead and held to be served by turns, at most.
READ_AHEAD = 16
_UID = struct.Struct("<I")  # fuse_in_header's uid, at offset 24


class Waiting:
    """Requests read from the kernel and not served yet, a queue per uid: `next` takes
    them with the uids by turns, each uid's in the order they came, root's first when
    it has one.  `free`: buffers to read the next requests into (anonymous memory:
    only the pages a request fills are ever committed)."""

    def __init__(self, size: int) -> None:
        self.size = size  # of a buffer: the longest request
        self.queues: dict[int, collections.deque] = {}
        self.turns: collections.deque[int] = collections.deque()
        self.count = 0
        self.free: list[mmap.mmap] = []

    def buffer(self) -> mmap.mmap:
        return self.free.pop() if self.free else mmap.mmap(-1, self.size)

    def add(self, buffer: mmap.mmap, length: int) -> None:
        uid = _UID.unpack_from(buffer, 24)[0]
        queue = self.queues.get(uid)
        if queue is None:
            queue = self.queues[uid] = collections.deque()
            if uid == 0:
                self.turns.appendleft(uid)
            else:
                self.turns.append(uid)
        queue.append((buffer, length))
        self.count += 1

    def next(self) -> tuple[mmap.mmap, int]:
        uid = self.turns[0]
        queue = self.queues[uid]
        request = queue.popleft()
        self.count -= 1
        if queue:
            self.turns.rotate(-1)
        else:
            self.turns.popleft()
            del self.queues[uid]
        return request
