"""A one-file FUSE filesystem that records every write and flush of a block device.

    blocklog.py MOUNTPOINT IMAGE LOG

MOUNTPOINT shows two files: `disk`, whose content is IMAGE (read and written in place),
and `marks`.  A loop device on `disk` turns each block write into a WRITE here and each
flush (REQ_PREFLUSH, and the flush after a FUA write, which loop does not offer) into an
FSYNC of the file; the log records them in the order they arrived, as dm-log-writes
does for xfstests.  A write to `marks` records a mark (its data is a label: a test
writes one after each operation the filesystem on the device acknowledged).

Log records: a header (kind, offset, length), then `length` bytes (the data of a
write, the label of a mark).  A write arrived before a flush was issued if it was
acknowledged before, so replaying the writes up to a flush and any subset of those
after it gives a state the device could hold after a power cut there (read_log,
tests/test_power_cut.py).

Served by rofs's own FUSE protocol layer (rofs.fuse); runs until unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys

from rofs.fuse import FuseError, Operations, Session, proto
from rofs.fuse import mount as fuse_mount

WRITE, FLUSH, MARK = 1, 2, 3
RECORD = struct.Struct("<BQI")
DISK, MARKS = 2, 3
NAMES = {b"disk": DISK, b"marks": MARKS}
TIMEOUT = 3600


def read_log(path: str):
    """The records of a log: (kind, offset, data)."""
    records = []
    with open(path, "rb") as f:
        blob = f.read()
    at = 0
    while at + RECORD.size <= len(blob):
        kind, offset, length = RECORD.unpack_from(blob, at)
        at += RECORD.size
        records.append((kind, offset, blob[at:at + length]))
        at += length
    return records


class BlockLog(Operations):
    def __init__(self, image: str, log: str) -> None:
        super().__init__()
        self.image = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.image).st_size
        self.log = open(log, "ab", buffering=1 << 20)

    def _attr(self, ino: int) -> tuple:
        if ino == proto.ROOT_ID:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o600, self.size if ino == DISK else 0, 1
        return (ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, nlink, 0, 0, 0,
                4096, 0)

    def lookup(self, req, parent, name):
        ino = NAMES.get(bytes(name)) if parent == proto.ROOT_ID else None
        if ino is None:
            raise FuseError(errno.ENOENT)
        return proto.ENTRY_OUT.pack(ino, 0, TIMEOUT, TIMEOUT, 0, 0, *self._attr(ino))

    def getattr(self, req, ino, fh):
        return proto.ATTR_OUT.pack(TIMEOUT, 0, 0, *self._attr(ino))

    def setattr(self, req, ino, fields):
        return self.getattr(req, ino, None)

    def open(self, req, ino, flags):
        # Direct I/O: every write of the loop device reaches this process when issued.
        return proto.OPEN_OUT.pack(0, proto.FOPEN_DIRECT_IO, 0)

    def read(self, req, ino, fh, offset, size):
        return os.pread(self.image, size, offset) if ino == DISK else b""

    def write(self, req, ino, fh, offset, data, flags=0):
        data = bytes(data)
        if ino == DISK:
            if offset + len(data) > self.size:
                raise FuseError(errno.ENOSPC)
            os.pwrite(self.image, data, offset)
            self.log.write(RECORD.pack(WRITE, offset, len(data)) + data)
        else:
            self.log.write(RECORD.pack(MARK, 0, len(data)) + data)
        return proto.WRITE_OUT.pack(len(data), 0)

    def fsync(self, req, ino, fh, datasync):
        if ino == DISK:
            self.log.write(RECORD.pack(FLUSH, 0, 0))

    def release(self, req, ino, fh):
        pass

    def destroy(self) -> None:
        self.log.flush()


def main() -> int:
    mountpoint, image, log = sys.argv[1:4]
    ops = BlockLog(image, log)
    fd = fuse_mount.mount(mountpoint, ["fsname=blocklog", "subtype=blocklog"])
    session = Session(fd, ops, want=proto.ASYNC_READ | proto.BIG_WRITES | proto.MAX_PAGES)
    try:
        session.run()
    finally:
        ops.log.flush()
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
