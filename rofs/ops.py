"""The FUSE adapter: requests in (rofs.fuse), overlay calls, replies out.

A protocol adapter only: every handler translates its arguments, calls the overlay and
packs the reply (rofs.fuse.proto).  The meaning lives in `rofs.overlay`; turning
exceptions into errno values, in `rofs.fuse.session`.

Kernel caching: every change to the merged view goes through this mount, so the kernel
may keep names, negative lookups, attributes and file pages for as long as it likes
(`TIMEOUT`, `FOPEN_KEEP_CACHE`).  Where rofs changes something behind the kernel's back
it must invalidate; the core overlay never does.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import struct
from collections.abc import Callable

from rofs import crash
from rofs._sys import RENAME_EXCHANGE
from rofs.fuse import FuseError, Operations, proto
from rofs.overlay import Attr, Overlay
from rofs.store.policy import Policy
from rofs.store.writelog import WriteLog

log = logging.getLogger(__name__)

TIMEOUT = 365 * 24 * 3600
WRITTEN_BY = 4096  # with no_open: (file, process) pairs whose first write was logged

# What rofs asks the kernel for at INIT (each only if the kernel offers it).
WANT = (proto.ASYNC_READ | proto.ATOMIC_O_TRUNC | proto.EXPORT_SUPPORT | proto.BIG_WRITES
        | proto.DONT_MASK | proto.AUTO_INVAL_DATA | proto.DO_READDIRPLUS
        | proto.ASYNC_DIO | proto.PARALLEL_DIROPS
        | proto.POSIX_ACL | proto.MAX_PAGES | proto.SETXATTR_EXT | proto.HAS_IOCTL_DIR
        | proto.CACHE_SYMLINKS)

READDIR_ENTRIES = 128  # names looked at for one READDIR(PLUS) reply (see _readdir)

# chattr and lsattr: FS_IOC_GETFLAGS/SETFLAGS, and their 32-bit forms (an int each way);
# FS_IOC_FSGETXATTR/FSSETXATTR (struct fsxattr), which the kernel itself asks before it
# sends a SETFLAGS.
FLAG_IOCTLS = {0x80086601: "get", 0x80046601: "get", 0x40086602: "set", 0x40046602: "set",
               0x801C581F: "xget", 0x401C5820: "xset"}
FSXATTR = struct.Struct("<IIIII8x")
# FS_*_FL <-> FS_XFLAG_*: immutable, append, sync, noatime, nodump.
XFLAGS = ((0x10, 0x08), (0x20, 0x10), (0x08, 0x20), (0x80, 0x40), (0x40, 0x80))

_NEGATIVE = proto.ENTRY_OUT.pack(0, 0, TIMEOUT, 0, 0, 0, *([0] * 16))
# A READDIRPLUS entry without attributes (node id 0), for a name rofs cannot look up.
NO_ENTRY = bytes(proto.ENTRY_OUT.size)
DOTS = (b".", b"..")
DT_DIR = stat.S_IFDIR >> 12


_ENTRY = proto.ENTRY_OUT.pack
_ATTR = proto.ATTR_OUT.pack


def entry_out(attr: Attr) -> bytes:
    """A struct fuse_entry_out (times: seconds, signed, and nanoseconds)."""
    a_s, a_ns = divmod(attr.atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(attr.mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(attr.ctime_ns, 1_000_000_000)
    return _ENTRY(attr.ino, attr.generation, TIMEOUT, TIMEOUT, 0, 0, attr.ino, attr.size,
                  attr.blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns,
                  attr.mode, attr.nlink, attr.uid, attr.gid, attr.rdev & 0xFFFFFFFF,
                  attr.blksize, 0)


def attr_out(attr: Attr) -> bytes:
    """A struct fuse_attr_out."""
    a_s, a_ns = divmod(attr.atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(attr.mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(attr.ctime_ns, 1_000_000_000)
    return _ATTR(TIMEOUT, 0, 0, attr.ino, attr.size, attr.blocks, a_s, m_s,
                 c_s, a_ns, m_ns, c_ns, attr.mode, attr.nlink, attr.uid, attr.gid,
                 attr.rdev & 0xFFFFFFFF, attr.blksize, 0)


def open_out(fh: int) -> bytes:
    return proto.OPEN_OUT.pack(fh, proto.FOPEN_KEEP_CACHE, 0)


class RofsOperations(Operations):
    # The kernel keeps directory listings across opens: every change of a name goes
    # through this mount (the kernel drops the listing itself), and where rofs changes
    # one behind its back (revert, restore) it invalidates the directory (rofs.daemon.control).
    opendir_flags = proto.FOPEN_CACHE_DIR | proto.FOPEN_KEEP_CACHE

    def __init__(self, overlay: Overlay, on_ready: Callable[[], None] | None = None, *,
                 writelog: WriteLog | None = None, policy: Policy | None = None,
                 no_open: bool = False) -> None:
        super().__init__()
        self.overlay = overlay
        self.writelog = writelog
        self.policy = policy or Policy()
        self._written: set[int] = set()  # file handles whose first write was logged
        # With no_open: (inode, pid) whose first write was logged, the newest last.
        self._written_by: collections.OrderedDict[tuple[int, int], None] = \
            collections.OrderedDict()
        self._on_ready = on_ready
        # no_open (-o noopen): OPEN answers ENOSYS, after which the kernel opens files
        # itself and never sends OPEN or RELEASE again; reads and writes then come with
        # file handle 0 and go to the node's own descriptors (Overlay.node_handle).  An
        # O_TRUNC then arrives as a SETATTR (so no ATOMIC_O_TRUNC).
        self.no_open = no_open
        self.want = WANT & ~proto.ATOMIC_O_TRUNC if no_open else WANT

    def init(self, conn: dict) -> None:
        # The kernel's INIT arrived: the mount now answers requests.
        if self._on_ready is not None:
            self._on_ready()

    # ----------------------------------------------------------------- helpers

    def _reply_new(self, node) -> bytes:
        reply = entry_out(self.overlay.getattr(node))
        self.overlay.remember(node)
        return reply

    def _change(self, op: str, req, node, name: bytes | None = None, node2=None,
                name2: bytes | None = None, *, only_failures: bool = False):
        """A context for one change: records it in the write log, with its outcome."""
        if self.writelog is None:
            return _NO_RECORD
        return _Record(self, op, req.pid, req.uid, self._path(node, name),
                       self._path(node2, name2) if node2 is not None else None, only_failures)

    def _durable(self, reply=None):
        """`reply`, once the change made is on disk (docs/reliability.md): at once when
        nothing is left to sync."""
        if self.overlay.settled:
            return reply
        return self._settle(reply)

    async def _settle(self, reply):
        await self.overlay.settle()
        return reply

    def _absent(self, parent, name: bytes) -> bool:
        try:
            return self.overlay.lookup(parent, name) is None
        except OSError:
            return False

    def _class(self, path) -> tuple[str, tuple | None]:
        """The class of a path, and the rule that decided it (None: the default)."""
        rule = self.policy.rule_for(path) if path is not None else None
        if rule is None:
            return self.policy.default.value, None
        return rule.cls.value, rule.path

    def _path(self, node, name: bytes | None = None):
        path = self.overlay.path_of(node)
        if path is not None and name is not None:
            path += (name,)
        return path

    def _node(self, inode: int):
        self.overlay.fds.trim()  # safe point: no descriptor of this request is in use yet
        return self.overlay.node(inode)

    # ------------------------------------------------------------------ names

    def lookup(self, req, parent_inode, name):
        if crash.POISON is not None and name == crash.POISON:
            crash.poisoned()  # (tests only)
        node = self.overlay.lookup(self._node(parent_inode), name)
        if node is None:
            return _NEGATIVE
        return self._reply_new(node)

    def forget(self, items):
        for inode, count in items:
            try:
                self.overlay.forget(inode, count)
            except Exception:
                log.exception("internal error in forget(%d, %d)", inode, count)
        self.overlay.trim()

    def getattr(self, req, inode, fh):
        return attr_out(self.overlay.getattr(self._node(inode)))

    def setattr(self, req, inode, fields):
        node = self._node(inode)
        op = "+".join(name for name, on in (
            ("truncate", fields.size is not None), ("chmod", fields.mode is not None),
            ("chown", fields.uid is not None or fields.gid is not None),
            ("utimens", fields.atime_ns is not None or fields.mtime_ns is not None
             or fields.atime_now or fields.mtime_now)) if on) \
            if self.writelog is not None else ""
        return self._setattr(req, node, fields, op)

    async def _setattr(self, req, node, fields, op):
        now = None
        if fields.atime_now or fields.mtime_now:
            import time
            now = time.time_ns()
        with self._change(op, req, node):
            new = await self.overlay.setattr(
                node, mode=fields.mode, uid=fields.uid, gid=fields.gid, size=fields.size,
                atime_ns=now if fields.atime_now else fields.atime_ns,
                mtime_ns=now if fields.mtime_now else fields.mtime_ns,
                fh=fields.fh, times_now=now is not None)
        await self.overlay.settle()  # a copy-up
        return attr_out(new)

    def readlink(self, req, inode):
        return self.overlay.readlink(self._node(inode))

    def _made_before(self, req, parent, name: bytes, kind: int):
        """For a create that found its name taken: the node, when the request was sent
        again after a server died having made it (the kernel held the directory's lock
        since, so nothing else can have).  None: the name was taken before."""
        if not req.resent:
            return None
        node = self.overlay.lookup(parent, name)
        return node if node is not None and node.mode == kind else None

    def _gone_before(self, req, parent, name: bytes) -> bool:
        """For a removal that found no name: whether the request was sent again after a
        server died having removed it."""
        return req.resent and self._absent(parent, name)

    def mknod(self, req, parent_inode, name, mode, rdev):
        parent = self._node(parent_inode)
        with self._change("mknod", req, parent, name):
            try:
                node = self.overlay.mknod(parent, name, mode, rdev, req.uid, req.gid,
                                          req.umask)
            except FileExistsError:
                node = self._made_before(req, parent, name, stat.S_IFMT(mode))
                if node is None:
                    raise
        return self._durable(self._reply_new(node))

    def mkdir(self, req, parent_inode, name, mode):
        parent = self._node(parent_inode)
        with self._change("mkdir", req, parent, name):
            try:
                node = self.overlay.mkdir(parent, name, mode, req.uid, req.gid, req.umask)
            except FileExistsError:
                node = self._made_before(req, parent, name, stat.S_IFDIR)
                if node is None:
                    raise
        return self._durable(self._reply_new(node))

    def symlink(self, req, parent_inode, name, target):
        parent = self._node(parent_inode)
        with self._change("symlink", req, parent, name):
            try:
                node = self.overlay.symlink(parent, name, target, req.uid, req.gid)
            except FileExistsError:
                node = self._made_before(req, parent, name, stat.S_IFLNK)
                if node is None:
                    raise
        return self._durable(self._reply_new(node))

    async def unlink(self, req, parent_inode, name):
        parent = self._node(parent_inode)
        with self._change("unlink", req, parent, name):
            try:
                await self.overlay.unlink(parent, name)
            except FileNotFoundError:
                if not self._gone_before(req, parent, name):
                    raise
        await self.overlay.settle()

    def rmdir(self, req, parent_inode, name):
        parent = self._node(parent_inode)
        with self._change("rmdir", req, parent, name):
            try:
                self.overlay.rmdir(parent, name)
            except FileNotFoundError:
                if not self._gone_before(req, parent, name):
                    raise
        return self._durable()

    async def rename(self, req, parent_inode_old, name_old, parent_inode_new, name_new,
                     flags):
        src, dst = self._node(parent_inode_old), self.overlay.node(parent_inode_new)
        with self._change("exchange" if flags & RENAME_EXCHANGE else "rename", req, src,
                          name_old, dst, name_new) as record:
            if record is not None and not flags & RENAME_EXCHANGE:
                # Whether the destination is a new name (for `report --suggest`).
                record.new = self._absent(dst, name_new)
            try:
                await self.overlay.rename(src, name_old, dst, name_new, flags)
            except FileNotFoundError:
                # Sent again after the move was made: the source is gone, the
                # destination there (an exchange cannot tell: done twice, undone).
                if flags & RENAME_EXCHANGE or not self._gone_before(req, src, name_old) \
                        or self._absent(dst, name_new):
                    raise
                self.overlay.moved_before(src, name_old, dst, name_new)
        await self.overlay.settle()

    async def link(self, req, inode, new_parent_inode, new_name):
        node, parent = self._node(inode), self.overlay.node(new_parent_inode)
        with self._change("link", req, parent, new_name, node):
            try:
                node = await self.overlay.link(node, parent, new_name)
            except FileExistsError:
                if not req.resent or self.overlay.lookup(parent, new_name) is not node:
                    raise
        await self.overlay.settle()
        return self._reply_new(node)

    # ------------------------------------------------------------------ files

    def open(self, req, inode, flags):
        if self.no_open:
            raise FuseError(errno.ENOSYS)
        node = self._node(inode)
        if flags & os.O_TRUNC or flags & os.O_ACCMODE != os.O_RDONLY:
            return self._open_writing(req, node, flags)
        return open_out(self.overlay.hand_out(
            self.overlay.open_for_reading(node, flags, req.pid, req.uid)))

    async def _open_writing(self, req, node, flags):
        # Logged when it truncates or fails; a plain open for writing is logged at its
        # first write.
        with self._change("truncate" if flags & os.O_TRUNC else "open", req, node,
                          only_failures=not flags & os.O_TRUNC):
            handle = await self.overlay.open(node, flags, req.pid, req.uid)
        await self.overlay.settle()  # a copy-up
        return open_out(self.overlay.hand_out(handle))

    def create(self, req, parent_inode, name, mode, flags):
        parent = self._node(parent_inode)
        with self._change("create", req, parent, name):
            try:
                handle, node = self.overlay.create(parent, name, mode, flags, req.uid,
                                                   req.gid, req.pid, req.umask)
            except FileExistsError:
                node = self._made_before(req, parent, name, stat.S_IFREG)
                if node is None:
                    raise
                return self._create_made_before(req, node, flags)
        return self._durable(self._reply_new(node) + open_out(self._hand_out_created(
            req, node, handle)))

    def _hand_out_created(self, req, node, handle) -> int:
        """The fh a CREATE answers.  With no_open, 0: the kernel that stopped sending
        OPEN sends no RELEASE either, even for a file it created, so a handle given to
        it would stay open for good; its writes come by node, like every other file's."""
        if self.no_open:
            self.overlay.release(handle.fh)
            if self.writelog is not None:  # the create says it all
                self._written_by[(node.ino, req.pid)] = None
            return 0
        self._written.add(handle.fh)  # the create says it all
        return self.overlay.hand_out(handle)

    async def _create_made_before(self, req, node, flags):
        """A create (O_EXCL) sent again after a server died having made the file: the
        file it made, opened (nothing can have written to it: no one had a handle)."""
        handle = await self.overlay.open(node, flags & ~(os.O_CREAT | os.O_EXCL), req.pid,
                                         req.uid)
        await self.overlay.settle()
        return self._reply_new(node) + open_out(self._hand_out_created(req, node, handle))

    def read(self, req, inode, fh, offset, size):
        return self.overlay.read(self._handle_of(inode, fh), offset, size)

    def write(self, req, inode, fh, offset, data, flags=0):
        if not fh:
            node = self._node(inode)
            handle = self.overlay.writable_node_handle(node)
            if handle is None:  # a copy-up or a check first: keep the data
                return self._write_through_node(req, node, offset, bytes(data), flags)
            fh = handle.fh
            self._wrote_node(req, node)
        elif fh not in self._written:
            self._wrote(fh)
        written = self.overlay.write(fh, offset, data, req.resent)
        crash.point("write:done")
        return proto.WRITE_OUT.pack(written, 0)

    async def _write_through_node(self, req, node, offset, data, flags):
        handle = await self._node_writer(req, node, appending=bool(flags & os.O_APPEND))
        await self.overlay.settle()  # a copy-up
        return proto.WRITE_OUT.pack(self.overlay.write(handle.fh, offset, data), 0)

    async def _node_writer(self, req, node, appending=False):
        """With no_open: the node's handle for writing, after what an open for writing
        would have checked and done (a refusal is logged as a failed "open"); the
        process's first write to it logged."""
        handle = self.overlay.writable_node_handle(node)
        if handle is None:
            with self._change("open", req, node, only_failures=True):
                handle = await self.overlay.open_node_for_writing(node, appending=appending)
        self._wrote_node(req, node)
        return handle

    def _wrote(self, fh: int) -> None:
        """Log the first write through a handle (an open for writing is logged here)."""
        if fh in self._written or self.writelog is None:
            return
        self._written.add(fh)
        handle = self.overlay.handle(fh)
        self._record_write(handle.node, handle.pid, handle.uid)

    def _record_write(self, node, pid: int, uid: int) -> None:
        path = self.overlay.path_of(node)
        self.writelog.record("write", pid, uid, path, None, "ok", *self._class(path))

    def _wrote_node(self, req, node) -> None:
        """With no_open: log the first write of each process to a file (the most recent
        WRITTEN_BY ones are remembered)."""
        if self.writelog is None:
            return
        key = (node.ino, req.pid)
        if key in self._written_by:
            self._written_by.move_to_end(key)
            return
        self._written_by[key] = None
        if len(self._written_by) > WRITTEN_BY:
            self._written_by.popitem(last=False)
        self._record_write(node, req.pid, req.uid)

    def _handle_of(self, inode, fh) -> int:
        """The handle to read by: the kernel's, or with no_open (handle 0) the node's."""
        return fh or self.overlay.node_handle(self._node(inode)).fh

    def fallocate(self, req, inode, fh, offset, length, mode):
        if not fh:
            return self._fallocate_node(req, self._node(inode), offset, length, mode)
        self.overlay.fallocate(fh, offset, length, mode)

    async def _fallocate_node(self, req, node, offset, length, mode):
        handle = await self._node_writer(req, node)
        await self.overlay.settle()  # a copy-up
        self.overlay.fallocate(handle.fh, offset, length, mode)

    def lseek(self, req, inode, fh, offset, whence):
        # Only SEEK_DATA and SEEK_HOLE come here (the kernel keeps the file position).
        fh = self._handle_of(inode, fh)
        return proto.LSEEK_OUT.pack(self.overlay.lseek(fh, offset, whence))

    async def copy_file_range(self, req, inode, fh_in, off_in, inode_out, fh_out, off_out,
                              length, flags):
        if fh_out:
            self._wrote(fh_out)
        else:
            fh_out = (await self._node_writer(req, self._node(inode_out))).fh
            await self.overlay.settle()  # a copy-up
        # The source after the destination: opening a node for writing replaces its
        # read-only handle (the same node) or may push others out of the LRU.
        fh_in = self._handle_of(inode, fh_in)
        copied = await self.overlay.copy_file_range(fh_in, off_in, fh_out, off_out, length)
        return proto.WRITE_OUT.pack(copied, 0)

    # No flush(): rofs buffers nothing and leaves locks to the kernel, so ENOSYS tells
    # the kernel to stop sending FLUSH on every close().

    def release(self, req, inode, fh):
        self._written.discard(fh)
        self.overlay.release(fh)

    async def fsync(self, req, inode, fh, datasync):
        if not fh:
            handle = self.overlay.fsync_handle(self._node(inode))
            if handle is None:
                return  # never written through this mount: nothing of it to sync
            fh = handle.fh
        await self.overlay.fsync(fh, datasync)
        await self.overlay.settle(strict=True)

    # ------------------------------------------------------------ directories

    def opendir(self, req, inode, flags):
        if self.no_open:  # directories too (no_opendir): listed by node
            raise FuseError(errno.ENOSYS)
        return self.overlay.opendir(self._node(inode), req.uid)

    def readdir(self, req, inode, fh, offset, size, plus):
        node = None if fh else self._node(inode)
        if fh and fh not in self.overlay.dirs:
            self.overlay.resume_dir(fh, self._node(inode))
        if self.overlay.listing_to_read(fh, node, offset):
            return self._read_listing_first(req, inode, fh, node, offset, size, plus)
        return self._readdir(req, fh, node, offset, size, plus)

    async def _read_listing_first(self, req, inode, fh, node, offset, size, plus):
        """A READDIR that needs its listing read from the layers first: a big
        directory's is read on a worker thread (Overlay.read_listing)."""
        await self.overlay.read_listing(fh, node, offset, req.uid)
        return self._readdir(req, fh, node, offset, size, plus)

    def _readdir(self, req, fh, node, offset, size, plus):
        self.overlay.fds.trim()
        out = []
        used = 0
        entries = self.overlay.readdir(fh, offset) if fh else \
            self.overlay.readdir_by_node(node, offset, req.uid)
        # A reply holds at most READDIR_ENTRIES names looked at (the kernel asks again
        # from the last one's offset): the kernel may ask for a megabyte of entries at
        # once, and looking each up would hold every other request up meanwhile.
        left = READDIR_ENTRIES
        for next_id, name, node in entries:
            need = proto.dirent_size(len(name), plus)
            if used + need > size or (out and left <= 0):
                break
            left -= 1
            packed = self._dirent(next_id, name, node, plus)
            if packed is None:
                continue  # removed since the listing was taken
            out.append(packed)
            out.append(name)
            out.append(b"\0" * (need - len(name) - len(packed)))
            used += need
        return b"".join(out)

    def _dirent(self, next_id: int, name: bytes, node, plus: bool) -> bytes | None:
        """One entry of a READDIR(PLUS) reply, name and padding excepted."""
        overlay = self.overlay
        if name in DOTS:
            # . and ..: the kernel takes no reference for them (node id 0).
            return (NO_ENTRY if plus else b"") + proto.DIRENT.pack(
                node.ino, next_id, len(name), DT_DIR)
        attr = None
        if node is not None and plus:
            try:
                attr = overlay.getattr(node)
            except FileNotFoundError:
                return None
            except OSError:
                pass  # listed without attributes, as below
        if node is None or (plus and attr is None):
            # A name rofs cannot look up (EACCES in a r-- directory): listed with no
            # attributes (node id 0: the kernel looks it up when asked, and gets the
            # error then), type unknown, as a native filesystem lists it.
            return (NO_ENTRY if plus else b"") + proto.DIRENT.pack(
                0 if node is None else node.ino, next_id, len(name), 0)
        if plus:
            overlay.remember(node)
            return entry_out(attr) + proto.DIRENT.pack(attr.ino, next_id, len(name),
                                                       attr.mode >> 12)
        # (Only without READDIRPLUS, which rofs always asks for.)  The kernel takes no
        # reference: the node goes unless something else holds it.
        overlay.table.maybe_drop(node)
        return proto.DIRENT.pack(node.ino, next_id, len(name), node.mode >> 12)

    def releasedir(self, req, inode, fh):
        self.overlay.releasedir(fh)

    async def fsyncdir(self, req, inode, fh, datasync):
        if not fh:  # a directory the kernel opened itself (no_open)
            await self.overlay.fsyncdir(self._node(inode), datasync)
            await self.overlay.settle(strict=True)
            return
        self.overlay.resume_dir(fh, self._node(inode))
        handle = self.overlay.dirs.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        await self.overlay.fsyncdir(handle.node, datasync)
        await self.overlay.settle(strict=True)

    # ------------------------------------------------------------------- misc

    def statfs(self, req, inode):
        st = self.overlay.statfs()
        return proto.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                                     st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize, 0)

    def getxattr(self, req, inode, name):
        return self.overlay.getxattr(self._node(inode), name)

    def listxattr(self, req, inode):
        names = self.overlay.listxattr(self._node(inode))
        if req.uid != 0:
            # As the kernel's own filesystems do for a caller without CAP_SYS_ADMIN
            # (the kernel already refuses to read their values): trusted.* is not theirs
            # to see.  FUSE does not say which capabilities the caller has; uid 0 stands
            # for them.
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    async def setxattr(self, req, inode, name, value, flags):
        node = self._node(inode)
        with self._change("setxattr", req, node):
            await self.overlay.setxattr(node, name, value, flags)
        await self.overlay.settle()  # a copy-up

    async def removexattr(self, req, inode, name):
        node = self._node(inode)
        with self._change("removexattr", req, node):
            await self.overlay.removexattr(node, name)
        await self.overlay.settle()  # a copy-up

    def ioctl(self, req, inode, fh, flags, cmd, in_data, out_size):
        kind = FLAG_IOCTLS.get(cmd)
        if kind is None:
            raise FuseError(errno.ENOTTY)
        node = self._node(inode)
        if kind == "get":
            value = self.overlay.inode_flags(node)
            return proto.IOCTL_OUT.pack(0, 0, 0, 0) + \
                value.to_bytes(8, "little")[:out_size]
        if kind == "xget":
            flags = self.overlay.inode_flags(node)
            xflags = sum(x for f, x in XFLAGS if flags & f)
            return proto.IOCTL_OUT.pack(0, 0, 0, 0) + FSXATTR.pack(xflags, 0, 0, 0, 0)
        if kind == "xset":
            xflags = FSXATTR.unpack_from(in_data)[0]
            old = self.overlay.inode_flags(node) & ~sum(f for f, _ in XFLAGS)
            return self._set_flags(req, node, old | sum(f for f, x in XFLAGS if xflags & x))
        return self._set_flags(req, node, int.from_bytes(in_data[:4], "little"))

    async def _set_flags(self, req, node, value):
        with self._change("chattr", req, node):
            await self.overlay.set_inode_flags(node, value, req.uid)
        await self.overlay.settle()  # a copy-up
        return proto.IOCTL_OUT.pack(0, 0, 0, 0)


class _Record:
    """Records one change in the write log when the handler is done (see _change)."""

    __slots__ = ("ops", "op", "pid", "uid", "path", "path2", "only_failures", "new")

    def __init__(self, ops, op, pid, uid, path, path2, only_failures) -> None:
        self.ops, self.op, self.pid, self.uid = ops, op, pid, uid
        self.path, self.path2, self.only_failures = path, path2, only_failures
        self.new = False  # a rename whose destination did not exist

    def __enter__(self) -> _Record:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            if self.only_failures:
                return False
            result = "ok"
        else:
            code = getattr(exc, "errno", None)
            result = errno.errorcode.get(code, "EIO") if code else "EIO"
        self.ops.writelog.record(self.op, self.pid, self.uid, self.path, self.path2, result,
                                 *self.ops._class(self.path), new=self.new)
        return False


class _NoRecord:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        return False


_NO_RECORD = _NoRecord()
