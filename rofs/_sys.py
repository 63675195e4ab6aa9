"""Syscalls the os module lacks: renameat2(2) and friends.

Everything here is a thin, errno-preserving wrapper; callers get OSError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import re
import resource
import struct
import threading

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# O_NOATIME keeps reads from touching the lower layer's atimes.
O_NOATIME = getattr(os, "O_NOATIME", 0o1000000)


def open_noatime(path: bytes | str, flags: int = os.O_RDONLY, *,
                 dir_fd: int | None = None) -> int:
    """os.open for reading without updating the atime where that is allowed: O_NOATIME
    needs ownership or CAP_FOWNER, so a user other than root reads the files of others
    with atime updates (relatime)."""
    flags |= os.O_CLOEXEC
    try:
        return os.open(path, flags | O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(path, flags, dir_fd=dir_fd)


def raise_open_file_limit() -> None:
    """The soft open-file limit up to the hard one: a login shell's stock 1,024 is not
    what a daemon serving every user, or a tool walking a state, should be held to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# Inode flags (chattr).  FS_IOC_GETFLAGS/SETFLAGS move an int, whatever size their
# number encodes.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_SYNC_FL = 0x08
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
FS_NODUMP_FL = 0x40
FS_NOATIME_FL = 0x80
_NO_FLAGS = (errno.ENOTTY, errno.EINVAL, errno.ENOTSUP, errno.ENOSYS)


def get_inode_flags(fd: int) -> int:
    """FS_IOC_GETFLAGS of an open file or directory; 0 where the filesystem has none."""
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
    except OSError as e:
        if e.errno in _NO_FLAGS:
            return 0
        raise
    return struct.unpack_from("I", buf)[0]


# The flags a user may change (the kernel's FS_FL_USER_MODIFIABLE); others are the
# filesystem's own (extents, inline data, ...).
FS_FL_USER_MODIFIABLE = 0x604BC0FF


def set_inode_flags(fd: int, flags: int) -> None:
    """FS_IOC_SETFLAGS: the user-modifiable flags become `flags`; OSError as the
    filesystem answers (ENOTTY/EOPNOTSUPP where it has none)."""
    old = get_inode_flags(fd)
    new = (old & ~FS_FL_USER_MODIFIABLE) | (flags & FS_FL_USER_MODIFIABLE)
    if new != old:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", new) + bytes(4))


def add_inode_flags(fd: int, flags: int) -> None:
    """Set `flags` besides the ones the inode has; nothing where the filesystem (or the
    caller's privilege) does not allow it."""
    try:
        set_inode_flags(fd, get_inode_flags(fd) | flags)
    except OSError as e:
        if e.errno not in _NO_FLAGS + (errno.EPERM, errno.EACCES):
            raise


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


_prctl = _libc.prctl
_PR_SET_NAME = 15
TASK_COMM_LEN = 16  # the kernel keeps 15 bytes of a thread's name


def name_this_thread(name: str | None = None) -> None:
    """Give the calling thread its name in the kernel too (ps -L, top -H, /proc/PID/
    task/TID/comm, the journal's _COMM for the main thread): `name`, or its Python
    name.  Python leaves every thread with the program's name."""
    if name is None:
        name = threading.current_thread().name
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:TASK_COMM_LEN - 1]), 0, 0, 0)


_fallocate = _libc.fallocate
_syncfs = _libc.syncfs
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


FALLOC_FL_KEEP_SIZE = 0x01
# The most one read, write or copy moves (the kernel's MAX_RW_COUNT: INT_MAX rounded
# down to a page): a caller's size_t beyond it is a short transfer, as on any file.
MAX_RW_COUNT = 0x7FFFF000


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), with its mode (keep size, punch hole, zero range, ...)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# open_tree(2) and mount_setattr(2): the same numbers on every architecture (new calls).
_SYS_OPEN_TREE, _SYS_MOUNT_SETATTR = 428, 442
_OPEN_TREE_CLONE = 1
_AT_RECURSIVE = 0x8000
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOATIME = 0x10
_MOUNT_ATTR__ATIME = 0x70  # the atime group: cleared before NOATIME is set
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_read_only_tree(path: bytes | str) -> int | None:
    """A descriptor of a private clone of the mount tree at `path` (submounts too), made
    read-only and noatime: the kernel refuses every write through it and no read
    updates an atime, whatever the caller does with it.  Detached: no one else sees it,
    and it goes with its last descriptor.  None where the kernel or the caller's
    privileges do not allow it (before Linux 5.12; no CAP_SYS_ADMIN)."""
    fd = _syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(-100),
                  ctypes.c_char_p(os.fsencode(path)),
                  ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.ENOSYS, errno.EINVAL, errno.EACCES):
            return None
        raise OSError(err, os.strerror(err), path)
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOATIME, _MOUNT_ATTR__ATIME, 0, 0)
    if _syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(fd), ctypes.c_char_p(b""),
                ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE), ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        if err in (errno.EPERM, errno.ENOSYS, errno.EINVAL):
            return None
        raise OSError(err, os.strerror(err), path)
    return fd


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    """renameat2(2): atomic rename with NOREPLACE/EXCHANGE/WHITEOUT flags."""
    if _renameat2(old_dir, old, new_dir, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)


def mount_table() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount this process sees, in mount order
    (a later entry for the same point is on top); empty if /proc is not there."""
    return [(target, fstype) for target, fstype, _ in mount_entries()]


def mount_entries() -> list[tuple[str, str, str]]:
    """mount_table with each mount's superblock options (a FUSE mount's `user_id=`)."""
    out = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.rstrip(b"\n").split(b" ")
                # The kernel writes space, tab, newline and backslash as octal escapes.
                target = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
                rest = fields[fields.index(b"-") + 1:]
                out.append((os.fsdecode(target), os.fsdecode(rest[0]),
                            os.fsdecode(rest[2]) if len(rest) > 2 else ""))
    except OSError:
        pass
    return out


_OCTAL = re.compile(rb"\\([0-7]{3})")


def proc_path(dir_fd: int, name: bytes | None = None) -> bytes:
    """A path for APIs without dir_fd (xattrs): the entry `name` in the directory `dir_fd`.

    The kernel resolves /proc/self/fd/N to the open directory itself, so the path stays
    short however deep the directory is, and only `name` is looked up (never followed
    when the caller passes follow_symlinks=False).
    """
    if name is None:  # the directory itself ("/." so the magic link is always followed)
        return b"/proc/self/fd/%d/." % dir_fd
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def malloc_trim() -> None:
    """Return free heap memory to the system (glibc; a no-op elsewhere)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def syncfs(fd: int) -> None:
    """syncfs(2): everything written to the filesystem holding `fd` reaches its disk
    (an O_PATH descriptor will not do)."""
    own = os.open(b"/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(own) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(own)


_CLONE_FILES = 0x400
_PR_SET_PDEATHSIG = 1


def fork_sharing_files() -> int:
    """fork(), except that parent and child share one descriptor table (CLONE_FILES): a
    descriptor either opens is the other's, and lives while either does.  So a process
    that holds its descriptors this way can die without closing any (the daemon's keeper,
    rofs/daemon/keeper.py).  Only from a process with a single thread; Python is told
    of the fork as os.fork does.  Returns 0 in the child, its pid in the parent."""
    number = {"x86_64": 56, "aarch64": 220, "riscv64": 220}.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, "fork with a shared descriptor table: unknown "
                                    "syscall number on %s" % platform.machine())
    # PyDLL: the call keeps the GIL, as os.fork's does.
    libc = ctypes.PyDLL(None, use_errno=True)
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = libc.syscall(ctypes.c_long(number), ctypes.c_ulong(_CLONE_FILES | 17),
                       ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies."""
    if _prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
