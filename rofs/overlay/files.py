"""Open files: descriptors shared and kept idle, reads, writes, fsync."""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os

from rofs._sys import (
    FALLOC_FL_KEEP_SIZE,
    FS_APPEND_FL,
    FS_IMMUTABLE_FL,
    MAX_RW_COUNT,
    fallocate,
)
from rofs.overlay.base import (
    IDLE_READERS,
    NODE_HANDLES,
    OPEN_KEEP_FLAGS,
    FileHandle,
    OpenFile,
    _err,
    _held,
    _pread,
    _truncate,
)
from rofs.store.inodes import NO_FDS, Node
from rofs.store.journal import make_handle

log = logging.getLogger(__name__)


class Files:
    """Overlay's open files (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

    # ----------------------------------------------------------------- files

    def _check_files(self, uid: int) -> None:
        """ENFILE when a new open file would take a descriptor this caller may not have
        (users other than root stop short of a reserve that is root's, and each of them
        at a share of the rest)."""
        limit = self.file_limit if uid == 0 else self.user_file_limit
        closing = self.closer.pending()  # closed on a closer thread, not yet
        while self._idle and len(self._open_files) + closing >= limit:
            self._close_idle(next(iter(self._idle)))
        if len(self._open_files) + closing >= limit:
            raise _err(errno.ENFILE)
        if uid != 0 and self._fds_by_uid[uid] + (self.closer.pending(uid) if closing else 0) \
                >= self.uid_file_limit:
            raise _err(errno.ENFILE)

    def _register(self, fd: int, node: Node, flags: int, on_lower: bool, pid: int,
                  uid: int, shared: bool = False) -> FileHandle:
        file = OpenFile(fd, on_lower, shared, uid, flags & os.O_ACCMODE != os.O_RDONLY)
        self._open_files[fd] = file
        self._fds_by_uid[uid] += 1
        if shared:
            self._readers[id(node)] = file
        if not node.open_fds:
            node.open_fds = set()
        node.open_fds.add(fd)
        return self._handle(file, node, flags, pid, uid)

    def _handle(self, file: OpenFile, node: Node, flags: int, pid: int,
                uid: int) -> FileHandle:
        file.users += 1
        handle = FileHandle(make_handle(next(self._fhs), file.fd), file, node, flags, pid,
                            uid)
        self.files[handle.fh] = handle
        return handle

    def hand_out(self, handle: FileHandle) -> int:
        """The fh of a handle going to the kernel (an OPEN or CREATE reply), which will
        name it until it releases it: journaled, so a successor finds its file."""
        handle.handed = True
        file = handle.file
        file.handed += 1
        if self.journal is not None:
            self.journal.keep(file.fd, handle.node.ino, file.handed)
        return handle.fh

    def open_for_reading(self, node: Node, flags: int, pid: int = 0,
                         uid: int = 0) -> FileHandle:
        """open() without O_WRONLY, O_RDWR or O_TRUNC: synchronous (no copy-up)."""
        if node.is_dir:
            raise _err(errno.EISDIR)
        flags &= OPEN_KEEP_FLAGS
        reader = self._readers.get(id(node))
        if reader is not None and id(node) in self._idle:
            # Out of the idle ones first, so that making room cannot close it.
            del self._idle[id(node)]
            if not reader.on_lower or node.upper:  # copied up since
                self._close_file(reader, node)
                reader = None
            else:
                try:
                    self._check_files(uid)
                except OSError:
                    self._close_file(reader, node)
                    raise
                reader.uid = uid
                self._fds_by_uid[uid] += 1
                return self._handle(reader, node, flags, pid, uid)
        if reader is not None and reader.on_lower == (not node.upper):
            return self._handle(reader, node, flags, pid, uid)
        self._check_files(uid)
        return self._open(node, flags, pid, uid, False)

    async def open(self, node: Node, flags: int, pid: int = 0, uid: int = 0) -> FileHandle:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if not writing:
            return self.open_for_reading(node, flags, pid, uid)
        if node.is_dir:
            raise _err(errno.EISDIR)
        flags &= OPEN_KEEP_FLAGS
        self._check_files(uid)
        self.check_writable(node)
        self.check_unprotected(node, appending=flags & os.O_APPEND and
                               not flags & os.O_TRUNC)
        if not node.upper and flags & os.O_TRUNC:
            # The empty copy is opened before it is in place: an open that failed after
            # it would leave the file emptied.
            fd = await self.copy_up(node, data_limit=0, keep=True)
            if fd is not None:
                return self._register(self._with_flags(fd, flags), node, flags, False, pid,
                                      uid)
        elif not node.upper:
            await self.copy_up(node)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # Truncating waits for the file's pages the disk is writing: opened here,
            # truncated on a worker (through the descriptor: the same file whatever
            # renames meanwhile).  Times and errors are O_TRUNC's (both are
            # do_truncate in the kernel).
            handle = self._open(node, flags & ~os.O_TRUNC, pid, uid, True)
            try:
                with _held(handle.file.fd) as fd:
                    await self.loop.offload(_truncate, fd, 0)
            except BaseException:
                self.release(handle.fh)
                raise
            return handle
        return self._open(node, flags, pid, uid, True)

    @staticmethod
    def _with_flags(fd: int, flags: int) -> int:
        """A kept copy's read-write descriptor, with what the open asked for: O_APPEND
        and O_NONBLOCK are set on it; O_SYNC and O_DSYNC need a new open (if that fails,
        writes through it are not synchronous: logged)."""
        if flags & (os.O_APPEND | os.O_NONBLOCK):
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & (os.O_APPEND | os.O_NONBLOCK))
        if flags & (os.O_SYNC | os.O_DSYNC):
            try:
                new = os.open(b"/proc/self/fd/%d" % fd, flags & ~os.O_TRUNC | os.O_CLOEXEC)
            except OSError as e:
                log.error("open with O_SYNC after a copy-up: %s (writes are not "
                          "synchronous)", e)
                return fd
            os.close(fd)
            return new
        return fd

    def _open(self, node: Node, flags: int, pid: int, uid: int, writing: bool) -> FileHandle:
        # Read-only opens with no flag that changes how reads behave share a descriptor.
        share = not writing and not flags & ~os.O_ACCMODE and id(node) not in self._readers
        if node.upper:
            fd = self._open_upper(node, flags)
            return self._register(fd, node, flags, False, pid, uid, share)
        fd = self.lower.open(node.lower, flags & ~os.O_TRUNC)
        return self._register(fd, node, flags, True, pid, uid, share)

    def _open_upper(self, node: Node, flags: int) -> int:
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if node.links:
            parent, name = node.links[0]
            return os.open(name, flags, dir_fd=self.upper_dirfd(parent, self._lay(node)))
        # unlinked, reopened through /proc/PID/fd
        for fd in (*node.open_fds, node.keep_fd):
            if fd >= 0:
                return os.open(b"/proc/self/fd/%d" % fd, flags & ~os.O_NOFOLLOW)
        raise _err(errno.ENOENT)

    # ------------------------------------------- files the kernel opened (no_open)

    def node_handle(self, node: Node) -> FileHandle:
        """A handle to read `node` by (no_open: the kernel opened the file itself).
        Node handles count against nobody's share of descriptors (there are at most
        NODE_HANDLES), so reading many files never shuts a user out."""
        handle = self._node_handles.get(id(node))
        if handle is not None and (not handle.on_lower or not node.upper):
            self._node_handles.move_to_end(id(node))
            return handle
        if handle is not None:  # copied up since, and not repointed
            self._drop_node_handle(node)
        return self._keep_node_handle(node, self.open_for_reading(node, 0))

    def writable_node_handle(self, node: Node) -> FileHandle | None:
        """The node's handle for writing, if one is open and the write needs nothing
        more (not on a read-only path, which a rename may have made it; no inode
        flags): else None, and the caller goes through open_node_for_writing, which
        checks and says why."""
        handle = self._node_handles.get(id(node))
        if handle is None or handle.flags & os.O_ACCMODE != os.O_RDWR or node.prot:
            return None
        if self.policy is not None and handle.checked != self.generation:
            try:
                self.check_writable(node)  # a path walk: not again until names change
            except OSError:
                return None
            handle.checked = self.generation
        self._node_handles.move_to_end(id(node))
        return handle

    async def open_node_for_writing(self, node: Node, appending: bool = False) -> FileHandle:
        """What an open for writing does (the checks, the copy-up), at the first write
        (no_open), then a read-write handle for the node."""
        if node.is_dir:
            raise _err(errno.EISDIR)
        self.check_writable(node)
        self.check_unprotected(node, appending=appending)
        if not node.upper and not node.links:
            await self.copy_up_unlinked(node)
        elif not node.upper:
            await self.copy_up(node)
        handle = self._node_handles.get(id(node))
        if handle is not None and handle.flags & os.O_ACCMODE == os.O_RDWR:
            self._node_handles.move_to_end(id(node))
            return handle
        if handle is not None:
            self._drop_node_handle(node)
        self._check_files(0)
        return self._keep_node_handle(node, self._open(node, os.O_RDWR, 0, 0, True))

    def fsync_handle(self, node: Node) -> FileHandle | None:
        """A handle to fsync `node` by (no_open); None if it has no upper copy."""
        handle = self._node_handles.get(id(node))
        if handle is not None and not handle.on_lower:
            return handle
        return self.node_handle(node) if node.upper else None

    def _keep_node_handle(self, node: Node, handle: FileHandle) -> FileHandle:
        self._node_handles[id(node)] = handle
        if len(self._node_handles) > NODE_HANDLES:
            _, oldest = self._node_handles.popitem(last=False)
            self.release(oldest.fh)
        return handle

    def _drop_node_handle(self, node: Node) -> None:
        handle = self._node_handles.pop(id(node), None)
        if handle is not None:
            self.release(handle.fh)

    def handle(self, fh: int) -> FileHandle:
        handle = self.files.get(fh)
        if handle is None:
            if self._survivors:
                return self.resume_handle(fh)
            raise _err(errno.EBADF)
        return handle

    def read(self, fh: int, offset: int, size: int):
        """The bytes, or when they are not all in the page cache, a coroutine reading
        the rest on a worker (a read from the disk may wait behind other users' I/O;
        the loop must not)."""
        file = self.handle(fh).file
        if not file.nowait:
            return os.pread(file.fd, size, offset)
        view = memoryview(bytearray(size))
        try:
            got = os.preadv(file.fd, (view,), offset, os.RWF_NOWAIT)
            # Short: the end of the file, or the page cache lacked the next page.  The
            # cache stops at a page's end: a short read ending inside a page is the end
            # of the file (most small files), and only one ending on a page boundary
            # needs a look at the next byte.
            if got < size and got and not (offset + got) % mmap.PAGESIZE and \
                    os.preadv(file.fd, (view[got:got + 1],), offset + got, os.RWF_NOWAIT):
                got = -got  # more there: the next byte was in the cache after all
        except BlockingIOError:
            return self._read_rest(fh, b"", size, offset)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            file.nowait = False  # a filesystem that cannot say: read as it comes
            return os.pread(file.fd, size, offset)
        if got >= 0:
            return view[:got]
        return self._read_rest(fh, bytes(view[:-got]), size, offset)

    async def _read_rest(self, fh: int, got: bytes, size: int, offset: int) -> bytes:
        with _held(self.handle(fh).fd) as fd:
            rest = await self.loop.offload(_pread, fd, size - len(got), offset + len(got))
        return got + rest

    def _check_data_change(self, handle: FileHandle, fallocate_mode: int = 0) -> None:
        """EPERM for a change of an immutable file's data, or for one that may remove
        an append-only file's (fallocate but for allocating), whenever its descriptor was
        opened: what the kernel does for local files (VFS write and fallocate checks)
        and cannot do for FUSE, whose inodes never carry the flags."""
        prot = self.protection(handle.node)
        if prot & FS_IMMUTABLE_FL or \
                prot & FS_APPEND_FL and fallocate_mode & ~FALLOC_FL_KEEP_SIZE:
            raise _err(errno.EPERM)

    def write(self, fh: int, offset: int, data: bytes, resent: bool = False) -> int:
        """`resent`: the kernel sent it again after a server died (Session.resend); an
        append that server made before dying is not made twice."""
        handle = self.handle(fh)
        if handle.node.prot:  # known unprotected (0) costs nothing more
            self._check_data_change(handle)
        if resent and handle.flags & os.O_APPEND and _appended(handle.fd, offset, data):
            return len(data)
        return os.pwrite(handle.fd, data, offset)

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        """On a handle open for writing (the kernel checks), so on the upper copy."""
        handle = self.handle(fh)
        if handle.on_lower:
            raise _err(errno.EBADF)
        self._check_data_change(handle, mode)
        fallocate(handle.fd, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE on the file underneath.  rofs reads and writes with
        pread/pwrite, so moving a shared descriptor's position harms no one."""
        return os.lseek(self.handle(fh).fd, offset, whence)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int) -> int:
        """In the layers, on a worker thread (a big copy must not stall the loop).  The
        destination is open for writing (the kernel checks), so it is an upper copy;
        between filesystems the kernel answers EXDEV and falls back to its own copy."""
        source, target = self.handle(fh_in), self.handle(fh_out)
        if target.on_lower:
            raise _err(errno.EBADF)
        self._check_data_change(target)
        with _held(source.fd) as src, _held(target.fd) as dst:
            return await self.loop.offload(os.copy_file_range, src, dst,
                                           min(length, MAX_RW_COUNT), off_in, off_out)

    async def fsync(self, fh: int, datasync: bool) -> None:
        with _held(self.handle(fh).fd) as fd:
            await self.loop.offload(os.fdatasync if datasync else os.fsync, fd)

    def release(self, fh: int) -> None:
        handle = self.files.pop(fh, None)
        if handle is None:
            if not self._survivors:
                return
            try:
                handle = self.resume_handle(fh)
            except OSError:
                return
            del self.files[fh]
        file, node = handle.file, handle.node
        if handle.handed:
            file.handed -= 1
            if self.journal is not None:
                if file.handed:
                    self.journal.keep(file.fd, node.ino, file.handed)
                else:
                    self.journal.let_go(file.fd)
        file.users -= 1
        if file.users:
            return
        self._fds_by_uid[file.uid] -= 1
        if not self._fds_by_uid[file.uid]:
            del self._fds_by_uid[file.uid]
        if file.shared and file.on_lower and node.links and \
                self._readers.get(id(node)) is file:
            self._idle[id(node)] = (file, node)
            if len(self._idle) > IDLE_READERS:
                self._close_idle(next(iter(self._idle)))
            return
        self._close_file(file, node)

    def _close_idle(self, key: int) -> None:
        file, node = self._idle.pop(key)
        self._close_file(file, node)

    def _close_file(self, file: OpenFile, node: Node) -> None:
        if file.shared and self._readers.get(id(node)) is file:
            del self._readers[id(node)]
        del self._open_files[file.fd]
        if self._survivors:
            self._survivors.pop(file.fd, None)
        node.open_fds.discard(file.fd)
        if not node.open_fds:
            node.open_fds = NO_FDS
        if file.writing or not node.links:
            # ext4 writes a truncated and rewritten file out at its close; the last
            # close of an unlinked file frees its blocks: either may wait on the disk.
            self.closer.close(file.fd, file.uid)
        else:
            os.close(file.fd)
        self.table.maybe_drop(node)

    def close(self) -> None:
        self._node_handles.clear()
        for fh in list(self.files):
            self.release(fh)
        while self._idle:
            self._close_idle(next(iter(self._idle)))
        self.closer.drain()
        self.fds.close()


def _appended(fd: int, offset: int, data: bytes) -> bool:
    """Whether `data` is the end of the file, at `offset`: an append (O_APPEND writes
    where the file ends, whatever the offset) already made.  The kernel sends the size
    it knows as the offset and holds the file's lock until answered, so no other write
    came in between."""
    if os.fstat(fd).st_size != offset + len(data):
        return False
    try:  # (a handle for appending is often write-only)
        reader = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # the size says so
    try:
        return os.pread(reader, len(data), offset) == bytes(data)
    finally:
        os.close(reader)
