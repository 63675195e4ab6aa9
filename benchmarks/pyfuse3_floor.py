"""pyfuse3's floor: the smallest pyfuse3 filesystem, one file served from memory.

It answers the same requests rofs answers for open+read+close (OPEN, RELEASE; no FLUSH)
with no work at all, so its time per operation is the least any pyfuse3 filesystem can
take.  Used for docs/performance.md:

    mkdir -p /tmp/floor && python benchmarks/pyfuse3_floor.py /tmp/floor &
    (time open+read+close of /tmp/floor/passwd)  ;  fusermount3 -u /tmp/floor
"""
import errno
import stat
import sys

import pyfuse3
import trio

DATA = b"root:x:0:0:root:/root:/bin/bash\n" * 40

class Minimal(pyfuse3.Operations):
    def _attr(self, ino):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 1e9
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
        else:
            e.st_mode = stat.S_IFREG | 0o644
            e.st_size = len(DATA)
        return e
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)
    async def lookup(self, parent, name, ctx=None):
        if name != b"passwd":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)
    async def read(self, fh, off, size):
        return DATA[off:off + size]
    async def release(self, fh):
        pass

ops = Minimal()
opts = set(pyfuse3.default_options) | {"fsname=minimal"}
pyfuse3.init(ops, sys.argv[1], opts)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
