"""The floor of a plain Python FUSE loop: no pyfuse3, no libfuse, no trio.

A measurement prototype for docs/performance.md, not part of rofs: it mounts /dev/fuse
itself, reads each request with one read(2), answers it with one write(2), and serves one
file ("passwd") from memory.  It was the basis for rofs owning its FUSE channel (see
docs/performance.md); it stays as the floor rofs's own loop (rofs/fuse/) is measured
against:

    mkdir -p /tmp/raw && python benchmarks/raw_fuse_floor.py /tmp/raw &
    (time open+read+close of /tmp/raw/passwd)  ;  umount /tmp/raw

With --no-open it answers OPEN with ENOSYS, so the kernel never sends OPEN or RELEASE
again (FUSE's no_open): what a cached open+read+close costs with no request at all
(docs/performance.md, "no_open").

Structures follow <linux/fuse.h> (ABI 7.31 replies).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys

DATA = b"root:x:0:0:root:/root:/bin/bash\n" * 40

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # struct fuse_attr (88 bytes)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
ATTR_OUT_HEAD = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQII")

LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, DESTROY, BATCH_FORGET = (
    1, 2, 3, 14, 15, 18, 25, 26, 38, 42)
FOPEN_KEEP_CACHE = 1 << 1
TIMEOUT = 10**9


def attr(ino: int) -> bytes:
    if ino == 1:
        return ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
    return ATTR.pack(2, len(DATA), 1, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o644, 1, 0, 0, 0,
                     4096, 0)


def reply(fd: int, unique: int, body: bytes = b"", error: int = 0) -> None:
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)


def serve(fd: int, no_open: bool = False) -> None:
    buffer = bytearray(1 << 21)  # one buffer for every request: no allocation per read
    view = memoryview(buffer)
    while True:
        try:
            length = os.readv(fd, [buffer])
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted
                return
            raise
        _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buffer)
        body = view[IN_HEADER.size:length]
        if opcode == INIT:
            major, minor, readahead, flags = struct.unpack_from("<IIII", body)
            reply(fd, unique, INIT_OUT.pack(7, 31, readahead, 0, 16, 12, 1 << 20, 1, 256,
                                            0, 0))
        elif opcode == LOOKUP:
            if bytes(body).rstrip(b"\0") == b"passwd":
                reply(fd, unique, ENTRY_OUT_HEAD.pack(2, 0, TIMEOUT, TIMEOUT, 0, 0) + attr(2))
            else:
                reply(fd, unique, error=errno.ENOENT)
        elif opcode == GETATTR:
            reply(fd, unique, ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + attr(nodeid))
        elif opcode == OPEN and no_open:
            reply(fd, unique, error=errno.ENOSYS)
        elif opcode == OPEN:
            reply(fd, unique, OPEN_OUT.pack(nodeid, FOPEN_KEEP_CACHE, 0))
        elif opcode == READ:
            _, offset, size, _ = READ_IN.unpack_from(body)
            reply(fd, unique, DATA[offset:offset + size])
        elif opcode == RELEASE:
            reply(fd, unique)
        elif opcode in (FORGET, BATCH_FORGET):
            continue  # no reply
        elif opcode == DESTROY:
            reply(fd, unique)
            return
        else:  # FLUSH and everything else: not implemented (the kernel remembers)
            reply(fd, unique, error=errno.ENOSYS)


def main() -> int:
    target = os.path.abspath(sys.argv[1])
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    options = b"fd=%d,rootmode=40000,user_id=0,group_id=0,default_permissions" % fd
    if libc.mount(b"rawfloor", target.encode(), b"fuse.rawfloor", 0, options) != 0:
        print("mount failed:", os.strerror(ctypes.get_errno()), file=sys.stderr)
        return 1
    serve(fd, "--no-open" in sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
