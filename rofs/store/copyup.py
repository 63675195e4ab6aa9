"""Copy-up building blocks: copy data and metadata of a lower object into the work dir.

The overlay assembles a copy-up as: create the object under a temporary name in the
work dir (same filesystem as the upper layer), copy data, owner, mode, xattrs and times
onto it, fsync it, then rename it into place.  A crash at any point leaves either no
upper copy (the lower object still shows) or a complete one; temporaries are removed at
the next mount.

These functions are synchronous and touch only the descriptors they are given, so the
overlay may run the slow ones (data copy, fsync) in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from rofs import crash

log = logging.getLogger(__name__)

CHUNK = 1 << 24


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy `size` bytes from src to dst: copy_file_range (reflink-capable), else sendfile.

    Holes in the source are kept where the filesystem reports them (SEEK_DATA).
    """
    crash.pause("copy-up:data")  # (tests only)
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to EOF
                break
            data = offset
        if data >= size:
            break
        try:
            hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        _copy_range(src_fd, dst_fd, data, min(hole, size) - data)
        offset = hole
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    end = offset + count
    use_cfr = True
    while offset < end:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(CHUNK, end - offset),
                                       offset, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                   errno.EOPNOTSUPP, errno.EBADF):
                    raise
                use_cfr = False
                continue
        else:
            buf = os.pread(src_fd, min(1 << 20, end - offset), offset)
            n = len(buf) and os.pwrite(dst_fd, buf, offset)
        if n == 0:  # the source shrank under us: it is read-only, so this is an error
            raise OSError(errno.EIO, "short copy-up read")
        offset += n


def copy_xattrs(src: bytes | int, dst: bytes | int, is_private) -> None:
    """Copy every xattr but rofs's markers (`is_private`).  src/dst: path or fd.

    Paths are used with follow_symlinks=False.  Every xattr the destination can hold is
    copied, or the copy fails (OSError naming the xattr): a file capability or an ACL
    dropped would change what the file lets others do.  Only a namespace the state
    filesystem does not support at all (ENOTSUP for security.* without the module, say)
    is skipped, with a warning.
    """
    follow = isinstance(src, int)
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as e:
        if e.errno == errno.ENOTSUP:  # a lower filesystem without xattrs
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if is_private(bname):
            continue
        try:
            value = os.getxattr(src, bname, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        try:
            os.setxattr(dst, bname, value, follow_symlinks=isinstance(dst, int))
        except OSError as e:
            # An ACL is never dropped: a deny entry lost would open the copy to whom
            # the original kept out.
            if e.errno == errno.ENOTSUP and not bname.startswith(
                    (b"trusted.", b"user.", b"system.posix_acl_")):
                log.warning("copy-up: the state filesystem cannot hold xattr %r: not "
                            "copied", bname)
                continue
            log.error("copy-up: cannot copy xattr %r: %s", bname, e.strerror)
            raise OSError(e.errno, "%s (xattr %r)" % (e.strerror, bname)) from None


# Root gives every object the owner it should have.  Another user can only own what it
# creates (the kernel refuses to give a file away), so there an object keeps the daemon's
# uid, and the group too unless the daemon belongs to the wanted one: what `cp -p` does.
PRIVILEGED = os.geteuid() == 0


def chown(target: bytes | str | int, uid: int, gid: int, **kwargs) -> None:
    """os.chown, which an unprivileged daemon does as far as it is allowed to."""
    try:
        os.chown(target, uid, gid, **kwargs)
    except PermissionError:
        if PRIVILEGED:
            raise
        try:
            os.chown(target, -1, gid, **kwargs)
        except PermissionError:
            pass


def copy_meta(src_st: os.stat_result, dst: bytes | int, is_private,
              src_xattrs: bytes | int | None, *, extra: dict[bytes, bytes] | None = None) -> None:
    """Owner, mode, xattrs, then times (last: the other steps may touch them).

    Owner first: chown clears setuid/setgid bits and file capabilities, which the
    following chmod and xattr copy then restore.
    """
    symlink = stat.S_ISLNK(src_st.st_mode)
    follow = isinstance(dst, int)
    chown(dst, src_st.st_uid, src_st.st_gid, follow_symlinks=follow)
    if not symlink:
        os.chmod(dst, stat.S_IMODE(src_st.st_mode))
    if src_xattrs is not None:
        copy_xattrs(src_xattrs, dst, is_private)
    for name, value in (extra or {}).items():
        try:
            os.setxattr(dst, name, value, follow_symlinks=follow)
        except PermissionError:
            # user.* xattrs exist only on files and directories: with user.overlay.*
            # markers a symlink or special file goes without rofs.ino (its inode number
            # may change at the next mount).
            if not name.startswith(b"user.") or stat.S_ISREG(src_st.st_mode) or \
                    stat.S_ISDIR(src_st.st_mode):
                raise
    os.utime(dst, ns=(src_st.st_atime_ns, src_st.st_mtime_ns), follow_symlinks=follow)
