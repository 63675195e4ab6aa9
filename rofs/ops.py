"""The pyfuse3 adapter: inode numbers and request contexts in, overlay calls, FUSE out.

A protocol adapter only: every handler translates its arguments, calls the overlay and
builds the reply.  The meaning lives in `rofs.overlay`; errno mapping in `rofs.errors`.

Kernel caching: every change to the merged view goes through this mount, so the kernel
may keep names, negative lookups, attributes and file pages for as long as it likes
(`TIMEOUT`, `keep_cache`).  Where rofs changes something behind the kernel's back it
must invalidate; the core overlay never does.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

import pyfuse3

from rofs._sys import RENAME_EXCHANGE
from rofs.errors import Counters, fuse_errors
from rofs.overlay import Attr, Overlay
from rofs.policy import Policy
from rofs.writelog import WriteLog

log = logging.getLogger(__name__)

TIMEOUT = 365 * 24 * 3600.0


class RofsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # FUSE_POSIX_ACL: the kernel checks the ACLs getxattr reports (rofs.acl).
    enable_acl = True

    def __init__(self, overlay: Overlay, on_ready: Callable[[], None] | None = None, *,
                 writelog: WriteLog | None = None, policy: Policy | None = None) -> None:
        super().__init__()
        self.overlay = overlay
        self.writelog = writelog
        self.policy = policy or Policy()
        self._written: set[int] = set()  # file handles whose first write was logged
        self.counters = Counters()
        fault = os.environ.get("ROFS_FAULT_NAME")
        if fault:
            self.counters.fault_name = os.fsencode(fault)
        self._on_ready = on_ready

    def init(self) -> None:
        # Called once the kernel's FUSE_INIT arrived: the mount now answers requests.
        if self._on_ready is not None:
            self._on_ready()

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = attr.generation
        entry.entry_timeout = TIMEOUT
        entry.attr_timeout = TIMEOUT
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _reply_new(self, node) -> pyfuse3.EntryAttributes:
        entry = self._entry(self.overlay.getattr(node))
        self.overlay.remember(node)
        return entry

    def _change(self, op: str, ctx, node, name: bytes | None = None, node2=None,
                name2: bytes | None = None, *, only_failures: bool = False):
        """A context for one change: records it in the write log, with its outcome."""
        if self.writelog is None:
            return _NO_RECORD
        return _Record(self, op, ctx.pid, ctx.uid, self._path(node, name),
                       self._path(node2, name2) if node2 is not None else None, only_failures)

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

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx):
        node = self.overlay.lookup(self._node(parent_inode), name)
        if node is None:
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = TIMEOUT
            return entry
        return self._reply_new(node)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            try:
                self.overlay.forget(inode, count)
            except Exception:
                self.counters.internal_errors += 1
                log.exception("internal error in forget(%d, %d)", inode, count)
        self.overlay.trim()

    @fuse_errors
    async def getattr(self, inode, ctx):
        return self._entry(self.overlay.getattr(self._node(inode)))

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        op = "+".join(name for name, on in (
            ("truncate", fields.update_size), ("chmod", fields.update_mode),
            ("chown", fields.update_uid or fields.update_gid),
            ("utimens", fields.update_atime or fields.update_mtime)) if on) \
            if self.writelog is not None else ""
        with self._change(op, ctx, node):
            new = await self._setattr(node, attr, fields, fh)
        return self._entry(new)

    async def _setattr(self, node, attr, fields, fh):
        return await self.overlay.setattr(
            node,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh)

    @fuse_errors
    async def readlink(self, inode, ctx):
        return self.overlay.readlink(self._node(inode))

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._node(parent_inode)
        with self._change("mknod", ctx, parent, name):
            node = self.overlay.mknod(parent, name, mode, rdev, ctx.uid, ctx.gid, ctx.umask)
        return self._reply_new(node)

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._node(parent_inode)
        with self._change("mkdir", ctx, parent, name):
            node = self.overlay.mkdir(parent, name, mode, ctx.uid, ctx.gid, ctx.umask)
        return self._reply_new(node)

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._node(parent_inode)
        with self._change("symlink", ctx, parent, name):
            node = self.overlay.symlink(parent, name, target, ctx.uid, ctx.gid)
        return self._reply_new(node)

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        with self._change("unlink", ctx, parent, name):
            await self.overlay.unlink(parent, name)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        with self._change("rmdir", ctx, parent, name):
            self.overlay.rmdir(parent, name)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        src, dst = self._node(parent_inode_old), self.overlay.node(parent_inode_new)
        with self._change("exchange" if flags & RENAME_EXCHANGE else "rename", ctx, src,
                          name_old, dst, name_new) as record:
            if record is not None and not flags & RENAME_EXCHANGE:
                # Whether the destination is a new name (for `report --suggest`).
                record.new = self._absent(dst, name_new)
            await self.overlay.rename(src, name_old, dst, name_new, flags)

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node, parent = self._node(inode), self.overlay.node(new_parent_inode)
        with self._change("link", ctx, parent, new_name, node):
            node = await self.overlay.link(node, parent, new_name)
        return self._reply_new(node)

    # ------------------------------------------------------------------ files

    @fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & os.O_TRUNC or flags & os.O_ACCMODE != os.O_RDONLY:
            # Logged when it truncates or fails; a plain open for writing is logged at
            # its first write.
            with self._change("truncate" if flags & os.O_TRUNC else "open", ctx, node,
                              only_failures=not flags & os.O_TRUNC):
                handle = await self.overlay.open(node, flags, ctx.pid, ctx.uid)
        else:
            handle = await self.overlay.open(node, flags, ctx.pid, ctx.uid)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._node(parent_inode)
        with self._change("create", ctx, parent, name):
            handle, node = self.overlay.create(parent, name, mode, flags, ctx.uid, ctx.gid,
                                               ctx.pid, ctx.umask)
        self._written.add(handle.fh)  # the create says it all
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True), self._reply_new(node)

    @fuse_errors
    async def read(self, fh, off, size):
        return self.overlay.read(fh, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        if fh not in self._written and self.writelog is not None:
            self._written.add(fh)
            handle = self.overlay.handle(fh)
            path = self.overlay.path_of(handle.node)
            self.writelog.record("write", handle.pid, handle.uid, path, None, "ok",
                                 *self._class(path))
        return self.overlay.write(fh, off, buf)

    # No flush(): rofs buffers nothing and leaves locks to the kernel, so the ENOSYS of
    # pyfuse3's default tells the kernel to stop sending FLUSH on every close().

    @fuse_errors
    async def release(self, fh):
        self._written.discard(fh)
        self.overlay.release(fh)

    @fuse_errors
    async def fsync(self, fh, datasync):
        await self.overlay.fsync(fh, datasync)

    # ------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode, ctx):
        return self.overlay.opendir(self._node(inode), ctx.uid)

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        self.overlay.fds.trim()
        for next_id, name, node in self.overlay.readdir(fh, start_id):
            try:
                entry = self._entry(self.overlay.getattr(node))
            except OSError:
                continue  # vanished since the listing was taken
            if not pyfuse3.readdir_reply(token, name, entry, next_id):
                break
            self.overlay.remember(node)

    @fuse_errors
    async def releasedir(self, fh):
        self.overlay.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        handle = self.overlay.dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self.overlay.fsyncdir(handle.node, datasync)

    # ------------------------------------------------------------------- misc

    @fuse_errors
    async def statfs(self, ctx):
        st = self.overlay.statfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        return self.overlay.getxattr(self._node(inode), name)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        names = self.overlay.listxattr(self._node(inode))
        if ctx.uid != 0:
            # As the kernel's own filesystems do for a caller without CAP_SYS_ADMIN
            # (the kernel already refuses to read their values): trusted.* is not theirs
            # to see.  FUSE does not say which capabilities the caller has; uid 0 stands
            # for them.
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        node = self._node(inode)
        with self._change("setxattr", ctx, node):
            await self.overlay.setxattr(node, name, value)

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        with self._change("removexattr", ctx, node):
            await self.overlay.removexattr(node, name)

    @fuse_errors
    async def access(self, inode, mode, ctx):
        # Only reached without default_permissions; the kernel checks modes otherwise.
        attr = self.overlay.getattr(self._node(inode))
        groups = pyfuse3.get_sup_groups(ctx.pid) if ctx.pid else set()
        if not may_access(attr, mode, ctx.uid, ctx.gid, groups):
            raise pyfuse3.FUSEError(errno.EACCES)


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


def may_access(attr: Attr, mode: int, uid: int, gid: int, groups) -> bool:
    """POSIX permission bits check (no ACLs) for access(2)."""
    if mode == os.F_OK:
        return True
    if uid == 0:
        # root may read and write anything, and execute what anyone may execute.
        return not (mode & os.X_OK) or stat.S_ISDIR(attr.mode) or bool(attr.mode & 0o111)
    if attr.uid == uid:
        bits = (attr.mode >> 6) & 7
    elif attr.gid == gid or attr.gid in groups:
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    return mode & bits == mode
