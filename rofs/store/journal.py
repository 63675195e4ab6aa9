"""What the kernel holds of a serving process, kept where its successor finds it.

The kernel names inodes by the numbers rofs gave it (node ids) and open files by the
handles rofs gave it, for as long as it likes.  When the serving process dies, the one
that takes over the connection (rofs/daemon/keeper.py) must answer for every one of them.
Two memfds, which the keeper holds, and which outlive the process that writes them:

- the **name log**: each name a node id gained or lost, and each node id the table let
  go of, appended as it happens (before the reply that gives the kernel the node id),
  with a header: what INIT negotiated, and how many times the server was replaced.
  When it holds mostly names that are gone, it is written anew from the live table and
  put in place of the old one in one dup2 (a successor finds either, whole).
- the **descriptor slots**: for each descriptor number, the node id of the open file or
  kept object it stands for, 0 for anything else.  A file handle carries its
  descriptor's number (`handle_fd`), so a successor, which shares the descriptor table
  (`_sys.fork_sharing_files`), finds the file of every handle still open, and closes
  every other descriptor the dead process left.

Writing either is a store into shared memory: no system call on the request path.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterable

MAGIC = b"rofsjnl1"
# magic, bytes of records used, INIT's minor, flags, the kernel's flags, servers replaced,
# the last replacement's reason (a short text), the request the server started last,
# restarts that failed.
HEADER = struct.Struct("<8sQIQQI32sQI")
IN_HAND = struct.Struct("<Q")
IN_HAND_AT = 72
FAILED = struct.Struct("<I")
FAILED_AT = 80
START = 128  # the first record
RECORD = struct.Struct("<BQIQH")  # kind, node id, generation, parent node id, name length
LINK, UNLINK, DROP = 1, 2, 3
SLOT = struct.Struct("<QQ")  # node id, handles the kernel holds of it
FH_FD_BITS = 31  # a handle: (serial << FH_FD_BITS) | descriptor
COMPACT_MIN = 4 << 20  # a log smaller than this is never rewritten


def handle_fd(fh: int) -> int:
    """The descriptor a file handle stands for."""
    return fh & ((1 << FH_FD_BITS) - 1)


def make_handle(serial: int, fd: int) -> int:
    return ((serial & ((1 << (64 - FH_FD_BITS)) - 1)) << FH_FD_BITS) | fd


class Entry:
    """A node id as the log tells it: its generation and names."""

    __slots__ = ("generation", "links")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.links: list[tuple[int, bytes]] = []


class Journal:
    """The two memfds of one mount (module docstring).  `log_fd` and `slots_fd` are the
    keeper's numbers: they stay the same for every server of the mount.  The header is
    read and written with pread/pwrite (the keeper maps nothing: a mapping holds a
    descriptor of its own, which a successor would close); a server maps both
    (`attach`) to write records without system calls."""

    def __init__(self, log_fd: int, slots_fd: int) -> None:
        self.log_fd, self.slots_fd = log_fd, slots_fd
        self._log: mmap.mmap | None = None
        self._slots: mmap.mmap | None = None
        self._used = START
        self._records = 0  # written since the log was last rewritten
        self._live = 0  # names in it not yet taken back (roughly)
        # Where the live names come from when the log is rewritten: (node id,
        # generation, parent node id, name) of every name of every node.
        self.source: Callable[[], Iterable[tuple[int, int, int, bytes]]] | None = None

    @classmethod
    def create(cls, slots: int) -> Journal:
        """New memfds, for `slots` descriptor numbers (they grow as needed)."""
        log_fd = os.memfd_create("rofs-names", os.MFD_CLOEXEC)
        os.ftruncate(log_fd, 1 << 20)
        os.pwrite(log_fd, HEADER.pack(MAGIC, START, 0, 0, 0, 0, b"", 0, 0), 0)
        slots_fd = os.memfd_create("rofs-descriptors", os.MFD_CLOEXEC)
        os.ftruncate(slots_fd, max(slots, 1024) * SLOT.size)
        return cls(log_fd, slots_fd)

    def attach(self) -> None:
        """Map both memfds (in a server)."""
        self._log = mmap.mmap(self.log_fd, os.fstat(self.log_fd).st_size)
        self._slots = mmap.mmap(self.slots_fd, os.fstat(self.slots_fd).st_size)
        magic, self._used = struct.unpack_from("<8sQ", self._log, 0)
        if magic != MAGIC:
            raise ValueError("not a rofs journal")

    # ------------------------------------------------------------------ header

    def header(self) -> tuple[int, int, int, int, str]:
        """(minor, flags, kernel flags, servers replaced, last reason)."""
        _, _, minor, flags, kernel_flags, replaced, reason, _, _ = HEADER.unpack(
            os.pread(self.log_fd, HEADER.size, 0))
        return minor, flags, kernel_flags, replaced, reason.rstrip(b"\0").decode()

    def restarts_failed(self) -> int:
        return FAILED.unpack(os.pread(self.log_fd, FAILED.size, FAILED_AT))[0]

    def restart_failed(self) -> None:
        os.pwrite(self.log_fd, FAILED.pack(self.restarts_failed() + 1), FAILED_AT)

    def note(self, unique: int) -> None:
        """The server starts request `unique` (Session's `note`)."""
        IN_HAND.pack_into(self._log, IN_HAND_AT, unique)

    def in_hand(self) -> int:
        """The request the server started last (0: none since `set_in_hand(0)`)."""
        return IN_HAND.unpack(os.pread(self.log_fd, IN_HAND.size, IN_HAND_AT))[0]

    def set_in_hand(self, unique: int) -> None:
        os.pwrite(self.log_fd, IN_HAND.pack(unique), IN_HAND_AT)

    def set_negotiated(self, negotiated: tuple[int, int, int]) -> None:
        os.pwrite(self.log_fd, struct.pack("<IQQ", *negotiated), 16)

    def set_replaced(self, replaced: int, reason: str) -> None:
        os.pwrite(self.log_fd, struct.pack("<I32s", replaced, reason.encode()[:32]), 36)

    # --------------------------------------------------------------- the names

    def link(self, ino: int, generation: int, parent: int, name: bytes) -> None:
        """Node id `ino` has the name `name` in `parent`; parent 0: it is known (the
        kernel may hold it), with no name of its own (unlinked while in use)."""
        self._append(LINK, ino, generation, parent, name)
        self._live += 1

    def unlink(self, ino: int, parent: int, name: bytes) -> None:
        self._append(UNLINK, ino, 0, parent, name)
        self._live -= 1

    def drop(self, ino: int, names: int) -> None:
        """Node id `ino` is gone from the table, with its `names` names."""
        self._append(DROP, ino, 0, 0, b"")
        self._live -= names

    def _append(self, kind: int, ino: int, generation: int, parent: int,
                name: bytes) -> None:
        used = self._used
        end = used + RECORD.size + len(name)
        if end > len(self._log):
            if self._records > 2 * max(self._live, 0) + 4096 and \
                    len(self._log) >= COMPACT_MIN and self.source is not None:
                self.rewrite()
                used = self._used
                end = used + RECORD.size + len(name)
            if end > len(self._log):
                self._grow(end)
        log = self._log
        RECORD.pack_into(log, used, kind, ino, generation, parent, len(name))
        log[used + RECORD.size:end] = name
        # The record is whole before the header counts it.
        struct.pack_into("<Q", log, 8, end)
        self._used = end
        self._records += 1

    def _grow(self, needed: int) -> None:
        size = len(self._log)
        while size < needed:
            size *= 2
        os.ftruncate(self.log_fd, size)
        self._log.close()
        self._log = mmap.mmap(self.log_fd, size)

    def rewrite(self) -> None:
        """Write the log anew from `source` and put it in place of the old one."""
        records = bytearray()
        live = 0
        for ino, generation, parent, name in self.source():
            records += RECORD.pack(LINK, ino, generation, parent, len(name)) + name
            live += 1
        fd = os.memfd_create("rofs-names", os.MFD_CLOEXEC)
        try:
            size = 1 << 20
            while size < START + len(records) * 2:
                size *= 2
            os.ftruncate(fd, size)
            header = bytearray(os.pread(self.log_fd, HEADER.size, 0))
            struct.pack_into("<Q", header, 8, START + len(records))
            os.pwrite(fd, bytes(header), 0)
            os.pwrite(fd, bytes(records), START)
            os.dup2(fd, self.log_fd)  # one step: the old log or the new one
        finally:
            os.close(fd)
        self._log.close()
        self._log = mmap.mmap(self.log_fd, size)
        self._used = START + len(records)
        self._records = live
        self._live = live

    def replay(self) -> dict[int, Entry]:
        """The node ids the log says the kernel may hold, with their names."""
        entries: dict[int, Entry] = {}
        log = self._log
        at, end = START, self._used
        while at < end:
            kind, ino, generation, parent, length = RECORD.unpack_from(log, at)
            at += RECORD.size
            name = bytes(log[at:at + length])
            at += length
            if kind == LINK:
                entry = entries.get(ino)
                if entry is None or entry.generation != generation:
                    entry = entries[ino] = Entry(generation)
                if parent and (parent, name) not in entry.links:
                    entry.links.append((parent, name))
            elif kind == UNLINK:
                entry = entries.get(ino)
                if entry is not None and (parent, name) in entry.links:
                    entry.links.remove((parent, name))
            elif kind == DROP:
                entries.pop(ino, None)
        self._records = sum(len(e.links) for e in entries.values())
        self._live = self._records
        return entries

    # ------------------------------------------------------------- descriptors

    def keep(self, fd: int, ino: int, handles: int) -> None:
        """Descriptor `fd` stands for node id `ino`: an open file of which the kernel
        holds `handles` handles, or with 0, an object kept while the kernel holds it."""
        at = fd * SLOT.size
        if at + SLOT.size > len(self._slots):
            size = len(self._slots)
            while size < at + SLOT.size:
                size *= 2
            os.ftruncate(self.slots_fd, size)
            self._slots.close()
            self._slots = mmap.mmap(self.slots_fd, size)
        SLOT.pack_into(self._slots, at, ino, handles)

    def let_go(self, fd: int) -> None:
        at = fd * SLOT.size
        if at + SLOT.size <= len(self._slots):
            SLOT.pack_into(self._slots, at, 0, 0)

    def kept(self, fd: int) -> tuple[int, int]:
        """(node id, handles) descriptor `fd` stands for; node id 0 for nothing."""
        at = fd * SLOT.size
        if self._slots is None:  # not attached (a new server's first look)
            data = os.pread(self.slots_fd, SLOT.size, at)
            return SLOT.unpack(data) if len(data) == SLOT.size else (0, 0)
        if at + SLOT.size > len(self._slots):
            return 0, 0
        return SLOT.unpack_from(self._slots, at)
