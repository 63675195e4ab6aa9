"""Mounting and unmounting a FUSE filesystem: mount(2) as root; fusermount3 (setuid
root, from the fuse3 package) for anyone else, which mounts and hands back the /dev/fuse
descriptor over a socket (its _FUSE_COMMFD protocol).

Options are mount(8)'s: the generic ones (ro, nosuid, noexec, noatime, ...) become
mount flags, FUSE's own (allow_other, default_permissions, max_read=, fsname=,
subtype=) the mount data.  Like libfuse, a mount is nosuid,nodev unless `suid`/`dev` ask
otherwise.  An unknown option is an error before anything is mounted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import shutil
import socket
import stat
import subprocess

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME = 128, 256, 1024, 2048
MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
MNT_DETACH = 2

# option: (flags to set, flags to clear)
FLAG_OPTIONS = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0), "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "symfollow": (0, MS_NOSYMFOLLOW),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0), "nolazytime": (0, MS_LAZYTIME),
}
DATA_OPTIONS = {"allow_other", "default_permissions"}
VALUE_OPTIONS = {"max_read", "fsname", "subtype"}


class MountError(Exception):
    pass


class Options:
    def __init__(self, options) -> None:
        self.flags = MS_NOSUID | MS_NODEV
        self.data: list[str] = []
        self.fsname = "fuse"
        self.subtype = ""
        self.words: list[str] = []  # as given, but fsname and subtype
        for option in options:
            key, _, value = option.partition("=")
            if key not in ("fsname", "subtype"):
                self.words.append(option)
            if key in FLAG_OPTIONS and not value:
                on, off = FLAG_OPTIONS[key]
                self.flags = (self.flags | on) & ~off
            elif key in DATA_OPTIONS and not value:
                if option not in self.data:
                    self.data.append(option)
            elif key in VALUE_OPTIONS and value and "," not in value:
                if key == "fsname":
                    self.fsname = value
                elif key == "subtype":
                    self.subtype = value
                else:
                    self.data.append(option)
            else:
                raise MountError("unknown mount option %r" % option)

    def for_fusermount(self) -> str:
        """The option string fusermount3 takes (it makes the mount nosuid,nodev itself,
        unless root allows a user more)."""
        words = ["fsname=" + self.fsname] + (["subtype=" + self.subtype] if self.subtype
                                             else [])
        return ",".join(words + self.words)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(mountpoint: str, options) -> int:
    """Mount a FUSE filesystem at `mountpoint`; returns the /dev/fuse descriptor, on
    which the kernel's first request (INIT) is waiting."""
    opts = Options(options)
    if os.geteuid() != 0:
        return _fusermount(mountpoint, opts)
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise MountError("%s: %s" % (mountpoint, e.strerror)) from None
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError("cannot open /dev/fuse: %s (is the fuse module loaded?)"
                         % e.strerror) from None
    data = ",".join(["fd=%d" % fd, "rootmode=%o" % stat.S_IFMT(st.st_mode),
                     "user_id=%d" % os.geteuid(), "group_id=%d" % os.getegid()] + opts.data)
    fstype = "fuse." + opts.subtype if opts.subtype else "fuse"
    if _libc.mount(opts.fsname.encode(), os.fsencode(mountpoint), fstype.encode(),
                   opts.flags, data.encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise MountError("mount(2) of %s: %s" % (mountpoint, os.strerror(code)))
    return fd


def _fusermount(mountpoint: str, opts: Options) -> int:
    program = shutil.which("fusermount3")
    if program is None:
        raise MountError("fusermount3 not found (install the fuse3 package): a user other "
                         "than root mounts through it")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([program, "-o", opts.for_fusermount(), "--", mountpoint],
                                env=env, pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        theirs.close()
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        _, err = proc.communicate(timeout=60)
    finally:
        ours.close()
        theirs.close()
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        message = err.decode(errors="replace").strip() or "exit status %d" % proc.returncode
        raise MountError(message)
    os.set_inheritable(fds[0], False)
    return fds[0]


def still_mounted(fd: int) -> bool:
    """Whether the mount served through `fd` is still there (the kernel reports an
    error condition on the descriptor once it is unmounted or aborted)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return not any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))


def unmount(mountpoint: str, fd: int | None = None) -> None:
    """Detach the mount (lazily: open files keep working until closed).  Nothing when
    `fd` says it is gone already (someone unmounted it; a new mount may be there now)."""
    if fd is not None and not still_mounted(fd):
        return
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
            code = ctypes.get_errno()
            raise MountError("umount of %s: %s" % (mountpoint, os.strerror(code)))
        return
    program = shutil.which("fusermount3") or "fusermount3"
    result = subprocess.run([program, "-u", "-q", "-z", "--", mountpoint],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError("fusermount3 -u %s: %s" % (mountpoint, result.stderr.strip()))
