"""The request loop: read a request from /dev/fuse, decode it, call the filesystem,
write the reply.

Concurrency, in one place.  One thread, the loop's, owns the filesystem's model: it reads
every request and answers it inline, so no request ever sees another half-done.  A
handler is a plain function, or a coroutine when part of its work is slow; such a
coroutine may `await offload(fn, *args)`, which runs `fn` on a worker thread (shared
fairly between uids: rofs.fuse.workers) while the loop goes on answering other
requests, and resumes the handler on the loop's thread with the result; or `await
event.wait()` on an `Event` another handler sets.  Offloaded
functions must not touch the model: they get descriptors and buffers, and do system
calls.  Other threads (the control socket's) hand work to the loop with
`call_soon_threadsafe`.  Replies and notifications may be written from any thread (one
write(2) each); a notification that can wait on the kernel (inval_entry takes directory
locks a request in flight may hold) must not be written from the loop's thread.

Nothing here knows about overlays: `Operations` is the interface, with a method per
request; each returns the reply's body as bytes (built with `rofs.fuse.proto`), or None
for an empty one, or raises OSError (its errno goes to the kernel).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import time
import types
from collections.abc import Callable

from rofs.fuse import proto
from rofs.fuse.loop import Offload, Wait
from rofs.fuse.waiting import READ_AHEAD, Waiting
from rofs.fuse.workers import FairPool

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20  # bytes per WRITE request (256 pages)
MAX_PAGES = MAX_WRITE // 4096
WORKERS = 16  # threads for offloaded work (copy-ups of big files, fsync)
WORKER_RESERVE = 4  # of them, for root's work only
WORKER_SHARE = 6  # of them, at most for one uid other than root
# Threads for short offloaded work (durability's fsyncs), one of them for root's only.
# No smaller share per uid: each batch waits for the batches before it (durable.py), so
# holding a user's batches back would hold back root's after them.
SHORT_WORKERS = 4
# Errnos no caller can cause: rofs works on its own descriptors, one name at a time with
# O_NOFOLLOW (the kernel resolves symlinks), so these mean a bug in rofs.
SUSPECT = frozenset((errno.EBADF, errno.ELOOP, errno.EFAULT, errno.ENOTSOCK))
# An internal error is logged with its traceback once per kind (handler and exception
# type) per REPORT_SECONDS; the others of that kind are counted and said at the next
# report.  Whatever a caller finds that fails inside the daemon, it cannot flood the log.
REPORT_SECONDS = 60.0


class FuseError(OSError):
    """An answer for the kernel: errno only."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


class Request:
    """Who asks: the caller's uid, gid and pid (and, for creates, its umask)."""

    __slots__ = ("unique", "uid", "gid", "pid", "umask")

    def __init__(self, unique: int, uid: int, gid: int, pid: int) -> None:
        self.unique, self.uid, self.gid, self.pid = unique, uid, gid, pid
        self.umask = 0

    @property
    def resent(self) -> bool:
        """Sent again (Session.resend): a server before this one read it and may have
        done what it asks before it stopped, without answering."""
        return bool(self.unique & proto.UNIQUE_RESEND)


class SetAttr:
    """The fields of a SETATTR request; None: not to change.  `*_now`: the kernel asked
    for the current time (touch), not a given one (touch -d)."""

    __slots__ = ("mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "atime_now",
                 "mtime_now", "fh", "kill_suidgid")

    def __init__(self, body) -> None:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid,
         gid, _) = proto.SETATTR_IN.unpack_from(body)
        self.fh = fh if valid & proto.FATTR_FH else None
        self.size = size if valid & proto.FATTR_SIZE else None
        self.mode = mode if valid & proto.FATTR_MODE else None
        self.uid = uid if valid & proto.FATTR_UID else None
        self.gid = gid if valid & proto.FATTR_GID else None
        self.atime_now = bool(valid & proto.FATTR_ATIME_NOW)
        self.mtime_now = bool(valid & proto.FATTR_MTIME_NOW)
        self.atime_ns = atime * 1_000_000_000 + atimensec \
            if valid & proto.FATTR_ATIME and not self.atime_now else None
        self.mtime_ns = mtime * 1_000_000_000 + mtimensec \
            if valid & proto.FATTR_MTIME and not self.mtime_now else None
        self.kill_suidgid = bool(valid & proto.FATTR_KILL_SUIDGID)


class Operations:
    """What a filesystem answers.  Every method not overridden answers ENOSYS, which
    tells the kernel not to ask again where the protocol says so (FLUSH, ...)."""

    # FOPEN_* flags for OPENDIR replies.
    opendir_flags = 0

    def init(self, conn: dict) -> None:
        """After INIT: the negotiated protocol, as a dict (major, minor, flags)."""

    def destroy(self) -> None:
        pass

    def forget(self, items: list[tuple[int, int]]) -> None:
        pass


class _ErrorReports:
    """The rate limit of internal-error reports (REPORT_SECONDS); its memory is bounded
    by the kinds the code has, not by the requests."""

    def __init__(self) -> None:
        self._kinds: dict[tuple[str, str], tuple[float, int]] = {}

    def report(self, name: str, e: BaseException) -> None:
        kind = (name, type(e).__name__)
        now = time.monotonic()
        last, quiet = self._kinds.get(kind, (None, 0))
        if last is not None and now - last < REPORT_SECONDS:
            self._kinds[kind] = (last, quiet + 1)
            return
        self._kinds[kind] = (now, 0)
        log.error("internal error in %s%s", name, " (and %d more of this kind since the "
                  "last report, not logged)" % quiet if quiet else "", exc_info=e)


class Session:
    """Serves one mount: `run()` until it is unmounted or `stop()` is called."""

    def __init__(self, fd: int, ops: Operations, *, want: int,
                 fault_name: bytes | None = None,
                 resumed: tuple[int, int, int] | None = None,
                 note: Callable[[int], None] | None = None,
                 refuse: frozenset[int] = frozenset()) -> None:
        """`resumed`: this session takes over a connection another one served, whose
        INIT is over: (minor, flags, the kernel's flags) as that one negotiated them
        (`negotiated`); see `resend`.  `note(unique)` is called as each request starts
        (where a successor can read which one a server died on); requests whose unique
        (resent or not) is in `refuse` are answered EIO without being served."""
        self.fd = fd
        self.ops = ops
        self.want = want  # INIT flags the filesystem asks for (if the kernel offers them)
        self.flags = 0  # what was negotiated
        self.minor = 0
        self.kernel_flags = 0  # what the kernel offered
        if resumed is not None:
            self.minor, self.flags, self.kernel_flags = resumed
            ops.init({"major": proto.KERNEL_VERSION, "minor": self.minor,
                      "flags": self.flags})
        self.internal_errors = 0  # requests answered EIO because of a bug (logged)
        self._reports = _ErrorReports()
        self.fault_name = fault_name
        self._note = note
        self._refuse = refuse
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._stopping = False
        self._ready: collections.deque = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pool = FairPool(WORKERS, "rofs-io", reserve=WORKER_RESERVE,
                              share=WORKER_SHARE)
        self._short_pool = FairPool(SHORT_WORKERS, "rofs-sync", reserve=1,
                                    share=SHORT_WORKERS - 1)
        self._handlers = self._table()

    # ------------------------------------------------------------------ control

    @property
    def wakeup_fd(self) -> int:
        """For signal.set_wakeup_fd: a signal then wakes the loop."""
        return self._wake_w

    def stop(self) -> None:
        """End `run()` at the next wakeup (signal handlers call it)."""
        self._stopping = True
        self._wake()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop's thread, between requests."""
        self._ready.append(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake

    # --------------------------------------------------------------- replies

    def reply(self, unique: int, body: bytes | None = None) -> None:
        if body is None:
            self._write(_pack_out_header(16, 0, unique))
        elif len(body) > 16384:  # file data: no copy into one buffer
            self._write(_pack_out_header(16 + len(body), 0, unique), body)
        else:
            self._write(_pack_out_header(16 + len(body), 0, unique) + body)

    def reply_error(self, unique: int, code: int) -> None:
        self._write(proto.OUT_HEADER.pack(proto.OUT_HEADER.size, -code, unique))

    def _write(self, data: bytes, more: bytes | None = None) -> None:
        try:
            if more is None:
                os.write(self.fd, data)
            else:
                os.writev(self.fd, [data, more])
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def _notify(self, code: int, body: bytes) -> int:
        """An unsolicited message; returns 0 or the errno the kernel gave."""
        try:
            os.write(self.fd, proto.OUT_HEADER.pack(proto.OUT_HEADER.size + len(body), code,
                                                    0) + body)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    @property
    def negotiated(self) -> tuple[int, int, int]:
        """What a session taking over this connection needs (`resumed`)."""
        return self.minor, self.flags, self.kernel_flags

    def resend(self) -> int:
        """Have the kernel send again every request a server of this connection read
        and did not answer (one that died, or a session stopped with requests in
        hand), unique | UNIQUE_RESEND: a session taking over calls it before it serves.
        Returns 0, or the errno of a kernel without it (EINVAL before Linux 6.9).  The
        kernel sends them as they were: a change that was made before the server
        stopped comes again."""
        return self._notify(proto.NOTIFY_RESEND, b"")

    def invalidate_inode(self, ino: int, offset: int = 0, length: int = 0) -> int:
        """Forget cached attributes (and data from `offset`, all of it with length 0;
        offset -1: attributes only).  Not from the loop's thread."""
        return self._notify(proto.NOTIFY_INVAL_INODE,
                            proto.NOTIFY_INVAL_INODE_OUT.pack(ino, offset, length))

    def invalidate_entry(self, parent: int, name: bytes) -> int:
        """Forget a cached name.  Not from the loop's thread (the kernel takes the
        directory's lock, which a request waiting for the loop may hold)."""
        return self._notify(proto.NOTIFY_INVAL_ENTRY, proto.NOTIFY_INVAL_ENTRY_OUT.pack(
            parent, len(name), 0) + name + b"\0")

    # ------------------------------------------------------------------- loop

    def run(self) -> None:
        poll = select.epoll()
        poll.register(self.fd, select.EPOLLIN)
        poll.register(self._wake_r, select.EPOLLIN)
        fd, wake = self.fd, self._wake_r
        os.set_blocking(fd, False)  # reads end with EAGAIN when no request waits
        waiting = Waiting(MAX_WRITE + 4096)
        unmounted = False
        try:
            while not self._stopping:
                while self._ready:
                    self._ready.popleft()()
                if not waiting.count:
                    if unmounted:
                        return
                    ready = [ready_fd for ready_fd, _ in poll.poll()]
                    if wake in ready:
                        try:
                            os.read(wake, 4096)
                        except BlockingIOError:
                            pass
                    if fd not in ready:
                        continue
                # Before each request served: read those that came meanwhile, so the
                # next one is chosen by turns among all that wait.
                while not unmounted and waiting.count < READ_AHEAD:
                    buffer = waiting.buffer()
                    try:
                        length = os.readv(fd, [buffer])
                    except OSError as e:
                        waiting.free.append(buffer)
                        if e.errno == errno.EAGAIN:
                            break
                        if e.errno in (errno.ENOENT, errno.EINTR):
                            continue  # an interrupted request; try again
                        if e.errno == errno.ENODEV:
                            unmounted = True  # serve what was read, then end
                            break
                        raise
                    waiting.add(buffer, length)
                if waiting.count:
                    buffer, length = waiting.next()
                    if self._dispatch(memoryview(buffer), length):
                        return
                    waiting.free.append(buffer)
        finally:
            poll.close()
            for pool in (self._pool, self._short_pool):
                pool.shutdown()

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _dispatch(self, view: memoryview, length: int) -> bool:
        """Handle one request; True when the session is over (DESTROY)."""
        _, opcode, unique, nodeid, uid, gid, pid, _, _ = _unpack_header(view)
        body = view[_HEADER_SIZE:length]
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode == proto.INTERRUPT:
                return False  # ignored: the request finishes normally
            if opcode == proto.DESTROY:
                self.ops.destroy()
                self.reply(unique)
                return True
            self.reply_error(unique, errno.ENOSYS)
            return False
        req = Request(unique, uid, gid, pid)
        if self.debug:
            log.debug("%s #%d uid %d pid %d", _NAMES.get(opcode, opcode), unique, uid, pid)
        if self._note is not None:
            self._note(unique)
        if self._refuse and unique & ~proto.UNIQUE_RESEND in self._refuse:
            log.error("%s #%d (uid %d pid %d) answered EIO: servers died serving it",
                      _NAMES.get(opcode, opcode), unique & ~proto.UNIQUE_RESEND, uid, pid)
            self.reply_error(unique, errno.EIO)
            return False
        try:
            result = handler(req, nodeid, body)
        except Exception as e:
            self._fail(req, opcode, e)
            return False
        if type(result) is _COROUTINE:
            self._step(req, opcode, result, None, None)
        elif result is not _NO_REPLY:
            self.reply(unique, result)
        return False

    def _fail(self, req: Request, opcode: int, e: BaseException) -> None:
        if isinstance(e, OSError) and e.errno in SUSPECT and not isinstance(e, FuseError):
            # A descriptor rofs lost or a symlink it followed: a bug, not the caller's
            # doing, whatever the errno says.  Answered with it, but logged as internal.
            self.internal_errors += 1
            self._reports.report(_METHOD.get(opcode, opcode), e)
            self.reply_error(req.unique, e.errno)
            return
        if isinstance(e, OSError):
            if self.debug:
                log.debug("#%d -> %s", req.unique, errno.errorcode.get(e.errno, e.errno))
            self.reply_error(req.unique, e.errno or errno.EIO)
            return
        self.internal_errors += 1
        name = _METHOD.get(opcode, opcode)
        if isinstance(e, InjectedFault):
            e.args = ("injected fault in %s" % name,)
        self._reports.report(name, e)
        self.reply_error(req.unique, errno.EIO)

    def _step(self, req: Request, opcode: int, coro, value, error) -> None:
        """Run a handler coroutine until it finishes or waits."""
        try:
            step = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as stop:
            if stop.value is not _NO_REPLY:
                self.reply(req.unique, stop.value)
            return
        except Exception as e:
            self._fail(req, opcode, e)
            return
        if isinstance(step, Offload):
            def done(result, exc, req=req, opcode=opcode, coro=coro) -> None:
                self.call_soon_threadsafe(lambda: self._step(req, opcode, coro, result, exc))

            self._pool_for(step).submit(req.uid, step.fn, step.args, done)
        elif isinstance(step, Wait):
            step.event._waiters.append(
                lambda: self._ready.append(lambda: self._step(req, opcode, coro, None, None)))
        else:
            self._step(req, opcode, coro, None,
                       RuntimeError("a handler awaited %r, not offload() or an Event" % step))

    def _pool_for(self, step: Offload) -> FairPool:
        """The workers for offloaded work: bulk work's, or the short work's own, so bulk
        copies never hold it up; each shared fairly between uids (rofs.fuse.workers)."""
        if step.short:
            return self._short_pool
        return self._pool

    # ------------------------------------------------------------- decoding

    def _table(self) -> dict:
        ops = _Logged(self.ops) if self.debug else self.ops
        fault = self.fault_name

        def name_of(body, start: int = 0) -> bytes:
            end = bytes(body[start:]).index(b"\0")
            name = bytes(body[start:start + end])
            if fault is not None and name == fault:
                raise InjectedFault(name)
            return name

        def names_of(body, start: int = 0) -> tuple[bytes, bytes]:
            first = name_of(body, start)
            return first, name_of(body, start + len(first) + 1)

        def init(req, nodeid, body):
            return self._init(body)

        def lookup(req, nodeid, body):
            return ops.lookup(req, nodeid, name_of(body))

        def forget(req, nodeid, body):
            ops.forget([(nodeid, proto.FORGET_IN.unpack_from(body)[0])])
            return _NO_REPLY

        def batch_forget(req, nodeid, body):
            count = proto.BATCH_FORGET_IN.unpack_from(body)[0]
            start = proto.BATCH_FORGET_IN.size
            ops.forget([proto.FORGET_ONE.unpack_from(body, start + i * proto.FORGET_ONE.size)
                        for i in range(count)])
            return _NO_REPLY

        def getattr_(req, nodeid, body):
            flags, _, fh = proto.GETATTR_IN.unpack_from(body)
            return ops.getattr(req, nodeid, fh if flags & proto.GETATTR_FH else None)

        def setattr_(req, nodeid, body):
            return ops.setattr(req, nodeid, SetAttr(body))

        def readlink(req, nodeid, body):
            return ops.readlink(req, nodeid)

        def symlink(req, nodeid, body):
            name, target = names_of(body)
            return ops.symlink(req, nodeid, name, target)

        def mknod(req, nodeid, body):
            mode, rdev, umask, _ = proto.MKNOD_IN.unpack_from(body)
            req.umask = umask
            return ops.mknod(req, nodeid, name_of(body, proto.MKNOD_IN.size), mode, rdev)

        def mkdir(req, nodeid, body):
            mode, umask = proto.MKDIR_IN.unpack_from(body)
            req.umask = umask
            return ops.mkdir(req, nodeid, name_of(body, proto.MKDIR_IN.size), mode)

        def unlink(req, nodeid, body):
            return ops.unlink(req, nodeid, name_of(body))

        def rmdir(req, nodeid, body):
            return ops.rmdir(req, nodeid, name_of(body))

        def rename(req, nodeid, body):
            newdir = proto.RENAME_IN.unpack_from(body)[0]
            old, new = names_of(body, proto.RENAME_IN.size)
            return ops.rename(req, nodeid, old, newdir, new, 0)

        def rename2(req, nodeid, body):
            newdir, flags, _ = proto.RENAME2_IN.unpack_from(body)
            old, new = names_of(body, proto.RENAME2_IN.size)
            return ops.rename(req, nodeid, old, newdir, new, flags)

        def link(req, nodeid, body):
            old = proto.LINK_IN.unpack_from(body)[0]
            return ops.link(req, old, nodeid, name_of(body, proto.LINK_IN.size))

        def open_(req, nodeid, body):
            flags, _ = proto.OPEN_IN.unpack_from(body)
            return ops.open(req, nodeid, flags)

        def read(req, nodeid, body):
            fh, offset, size, _, _, _, _ = proto.READ_IN.unpack_from(body)
            return ops.read(req, nodeid, fh, offset, size)

        def write(req, nodeid, body):
            fh, offset, size, _, _, flags, _ = proto.WRITE_IN.unpack_from(body)
            start = proto.WRITE_IN.size
            return ops.write(req, nodeid, fh, offset, body[start:start + size], flags)

        def statfs(req, nodeid, body):
            return ops.statfs(req, nodeid)

        def release(req, nodeid, body):
            fh, flags, _, _ = proto.RELEASE_IN.unpack_from(body)
            return ops.release(req, nodeid, fh)

        def fsync(req, nodeid, body):
            fh, flags, _ = proto.FSYNC_IN.unpack_from(body)
            return ops.fsync(req, nodeid, fh, bool(flags & proto.FSYNC_FDATASYNC))

        def setxattr(req, nodeid, body):
            head = proto.SETXATTR_IN if self.flags & proto.SETXATTR_EXT \
                else proto.SETXATTR_IN_COMPAT
            size, flags = head.unpack_from(body)[:2]
            name = name_of(body, head.size)
            start = head.size + len(name) + 1
            return ops.setxattr(req, nodeid, name, bytes(body[start:start + size]), flags)

        def getxattr(req, nodeid, body):
            size, _ = proto.GETXATTR_IN.unpack_from(body)
            value = ops.getxattr(req, nodeid, name_of(body, proto.GETXATTR_IN.size))
            return _sized(value, size)

        def listxattr(req, nodeid, body):
            size, _ = proto.GETXATTR_IN.unpack_from(body)
            names = ops.listxattr(req, nodeid)
            return _sized(b"".join(n + b"\0" for n in names), size)

        def removexattr(req, nodeid, body):
            return ops.removexattr(req, nodeid, name_of(body))

        def opendir(req, nodeid, body):
            flags, _ = proto.OPEN_IN.unpack_from(body)
            fh = ops.opendir(req, nodeid, flags)
            return proto.OPEN_OUT.pack(fh, ops.opendir_flags, 0)

        def readdir(req, nodeid, body):
            fh, offset, size, _, _, _, _ = proto.READDIR_IN.unpack_from(body)
            return ops.readdir(req, nodeid, fh, offset, size, False)

        def readdirplus(req, nodeid, body):
            fh, offset, size, _, _, _, _ = proto.READDIR_IN.unpack_from(body)
            return ops.readdir(req, nodeid, fh, offset, size, True)

        def releasedir(req, nodeid, body):
            fh = proto.RELEASE_IN.unpack_from(body)[0]
            return ops.releasedir(req, nodeid, fh)

        def fsyncdir(req, nodeid, body):
            fh, flags, _ = proto.FSYNC_IN.unpack_from(body)
            return ops.fsyncdir(req, nodeid, fh, bool(flags & proto.FSYNC_FDATASYNC))

        def access(req, nodeid, body):
            mask, _ = proto.ACCESS_IN.unpack_from(body)
            return ops.access(req, nodeid, mask)

        def create(req, nodeid, body):
            flags, mode, umask, _ = proto.CREATE_IN.unpack_from(body)
            req.umask = umask
            return ops.create(req, nodeid, name_of(body, proto.CREATE_IN.size), mode, flags)

        def ioctl(req, nodeid, body):
            fh, flags, cmd, arg, in_size, out_size = proto.IOCTL_IN.unpack_from(body)
            start = proto.IOCTL_IN.size
            return ops.ioctl(req, nodeid, fh, flags, cmd,
                             bytes(body[start:start + in_size]), out_size)

        def fallocate(req, nodeid, body):
            fh, offset, length, mode, _ = proto.FALLOCATE_IN.unpack_from(body)
            return ops.fallocate(req, nodeid, fh, offset, length, mode)

        def lseek(req, nodeid, body):
            fh, offset, whence, _ = proto.LSEEK_IN.unpack_from(body)
            return ops.lseek(req, nodeid, fh, offset, whence)

        def copy_file_range(req, nodeid, body):
            fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = \
                proto.COPY_FILE_RANGE_IN.unpack_from(body)
            return ops.copy_file_range(req, nodeid, fh_in, off_in, nodeid_out, fh_out,
                                       off_out, length, flags)

        table = {proto.INIT: init, proto.LOOKUP: lookup, proto.FORGET: forget,
                 proto.BATCH_FORGET: batch_forget, proto.GETATTR: getattr_,
                 proto.SETATTR: setattr_, proto.READLINK: readlink, proto.SYMLINK: symlink,
                 proto.MKNOD: mknod, proto.MKDIR: mkdir, proto.UNLINK: unlink,
                 proto.RMDIR: rmdir, proto.RENAME: rename, proto.RENAME2: rename2,
                 proto.LINK: link, proto.OPEN: open_, proto.READ: read, proto.WRITE: write,
                 proto.STATFS: statfs, proto.RELEASE: release, proto.FSYNC: fsync,
                 proto.SETXATTR: setxattr, proto.GETXATTR: getxattr,
                 proto.LISTXATTR: listxattr, proto.REMOVEXATTR: removexattr,
                 proto.OPENDIR: opendir, proto.READDIR: readdir,
                 proto.READDIRPLUS: readdirplus, proto.RELEASEDIR: releasedir,
                 proto.FSYNCDIR: fsyncdir, proto.ACCESS: access, proto.CREATE: create,
                 proto.IOCTL: ioctl, proto.LSEEK: lseek, proto.FALLOCATE: fallocate,
                 proto.COPY_FILE_RANGE: copy_file_range}
        # What the filesystem does not implement answers ENOSYS without decoding (but
        # FORGET is never answered).
        always = (proto.INIT, proto.FORGET, proto.BATCH_FORGET)
        return {op: fn for op, fn in table.items()
                if op in always or _implements(self.ops, _METHOD.get(op, ""))}

    def _init(self, body) -> bytes:
        major, minor, max_readahead, flags = proto.INIT_IN.unpack_from(body)
        if major != proto.KERNEL_VERSION:
            # A newer major: answer with ours and the kernel retries (or gives up).
            return proto.INIT_OUT.pack(proto.KERNEL_VERSION, proto.KERNEL_MINOR_VERSION,
                                       0, 0, 0, 0, 0, 0, 0, 0, 0)
        if minor < proto.MIN_MINOR_VERSION:
            log.error("the kernel speaks FUSE 7.%d; rofs needs 7.%d (Linux 5.4) or later",
                      minor, proto.MIN_MINOR_VERSION)
            raise FuseError(errno.EPROTO)
        if flags & proto.INIT_EXT and len(body) >= proto.INIT_IN.size + 4:
            flags |= int.from_bytes(body[16:20], "little") << 32
        self.minor = min(minor, proto.KERNEL_MINOR_VERSION)
        self.kernel_flags = flags
        self.flags = flags & self.want
        reply = proto.INIT_OUT.pack(
            proto.KERNEL_VERSION, proto.KERNEL_MINOR_VERSION, max_readahead,
            self.flags & 0xFFFFFFFF, 16, 12, MAX_WRITE, 1, MAX_PAGES, 0, self.flags >> 32)
        self.ops.init({"major": major, "minor": self.minor, "flags": self.flags})
        return reply


class _Logged:
    """The filesystem's methods, each call logged with its arguments (--debug): file
    contents and long values as their length only."""

    def __init__(self, ops: Operations) -> None:
        self._ops = ops

    def __getattr__(self, name: str):
        method = getattr(self._ops, name)
        if not callable(method):
            return method  # a setting such as opendir_flags

        def logged(*args):
            log.debug("%s(%s)", name, ", ".join(_brief(a) for a in args
                                                if not isinstance(a, Request)))
            return method(*args)

        return logged


def _brief(arg) -> str:
    if isinstance(arg, (bytes, memoryview)) and len(arg) > 64:
        return "<%d bytes>" % len(arg)
    if isinstance(arg, memoryview):
        return repr(bytes(arg))
    return repr(arg)


class InjectedFault(Exception):
    """Raised for a request naming the fault name (tests of the internal-error path)."""


_NO_REPLY = object()  # FORGET and BATCH_FORGET are not answered
_COROUTINE = types.CoroutineType
_unpack_header = proto.IN_HEADER.unpack_from
_HEADER_SIZE = proto.IN_HEADER.size
_pack_out_header = proto.OUT_HEADER.pack

_METHOD = {proto.LOOKUP: "lookup", proto.FORGET: "forget", proto.BATCH_FORGET: "forget",
           proto.GETATTR: "getattr", proto.SETATTR: "setattr", proto.READLINK: "readlink",
           proto.SYMLINK: "symlink", proto.MKNOD: "mknod", proto.MKDIR: "mkdir",
           proto.UNLINK: "unlink", proto.RMDIR: "rmdir", proto.RENAME: "rename",
           proto.RENAME2: "rename", proto.LINK: "link", proto.OPEN: "open",
           proto.READ: "read", proto.WRITE: "write", proto.STATFS: "statfs",
           proto.RELEASE: "release", proto.FSYNC: "fsync", proto.SETXATTR: "setxattr",
           proto.GETXATTR: "getxattr", proto.LISTXATTR: "listxattr",
           proto.REMOVEXATTR: "removexattr", proto.OPENDIR: "opendir",
           proto.READDIR: "readdir", proto.READDIRPLUS: "readdir",
           proto.RELEASEDIR: "releasedir", proto.FSYNCDIR: "fsyncdir",
           proto.ACCESS: "access", proto.CREATE: "create", proto.IOCTL: "ioctl",
           proto.LSEEK: "lseek", proto.FALLOCATE: "fallocate",
           proto.COPY_FILE_RANGE: "copy_file_range"}
_NAMES = {op: name.upper() for op, name in _METHOD.items()}
_NAMES.update({proto.RENAME2: "RENAME2", proto.READDIRPLUS: "READDIRPLUS",
               proto.BATCH_FORGET: "BATCH_FORGET", proto.INIT: "INIT"})


def _implements(ops: Operations, name: str) -> bool:
    method = getattr(type(ops), name, None)
    return method is not None and method is not getattr(Operations, name, None)


def _sized(value: bytes, size: int) -> bytes:
    """A GETXATTR/LISTXATTR answer: the size alone when asked with size 0."""
    if size == 0:
        return proto.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value
