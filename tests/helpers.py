"""Mounting rofs from tests: one helper used by the pytest fixtures and by the scripts
that run inside private mount namespaces.

A mount is started in the foreground as a subprocess, awaited until it shows up in
/proc/self/mountinfo (failing at once if the process died), and always torn down:
`umount` (a user: `fusermount3 -u`), lazily if it must, then the process is reaped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROFS = [sys.executable, "-m", "rofs"]


def mounted_fstype(path: str) -> str | None:
    """fstype of the topmost mount at `path` (without touching the filesystem)."""
    fstype = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")
            if target == path:
                fstype = fields[fields.index("-") + 1]
    return fstype


def is_rofs_mounted(path: str) -> bool:
    return mounted_fstype(os.path.realpath(path)) == "fuse.rofs"


def unmount(path: str) -> None:
    """Unmount whatever rofs mount is at path: normally, else lazily."""
    path = os.path.realpath(path)
    if not is_rofs_mounted(path):
        return
    # Root needs no fusermount3 (its lock file in /etc is on the mount when it is /etc).
    command = ["umount"] if os.geteuid() == 0 else ["fusermount3", "-u"]
    if subprocess.run(command + [path], capture_output=True).returncode != 0:
        subprocess.run(command + ["-l" if os.geteuid() == 0 else "-z", path],
                       capture_output=True)
    deadline = time.monotonic() + 10
    while is_rofs_mounted(path) and time.monotonic() < deadline:
        time.sleep(0.02)


class RofsProcess:
    """A foreground rofs daemon serving one mount."""

    def __init__(self, mountpoint: str, state: str, lower: str | None = None,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.mountpoint = os.path.realpath(mountpoint)
        self.state = state
        self.lower = lower
        self.args = args
        self.env = None if env is None else {**os.environ, **env}
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()
        self._output: str | None = None

    def command(self) -> list[str]:
        cmd = ROFS + [self.mountpoint, "--state", self.state, "-f", *self.args]
        if self.lower is not None:
            cmd += ["--lower", self.lower]
        return cmd

    def start(self, timeout: float = 20) -> RofsProcess:
        if is_rofs_mounted(self.mountpoint):
            # Waiting for the mount would see the old one and pass for a new daemon.
            raise RuntimeError("%s is already a rofs mount" % self.mountpoint)
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while not is_rofs_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError("rofs exited with %s before mounting:\n%s"
                                   % (self.proc.returncode, self.output()))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("rofs did not mount within %ss:\n%s" % (timeout,
                                                                          self.output()))
            time.sleep(0.01)
        os.stat(self.mountpoint)  # the first request completes FUSE_INIT
        return self

    def server(self) -> int:
        """The pid of the process serving the mount (the keeper's child)."""
        pid = self.proc.pid
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            children = [int(c) for c in f.read().split()]
        if len(children) != 1:
            raise RuntimeError("the keeper %d has children %r" % (pid, children))
        return children[0]

    def kill_server(self, timeout: float = 20) -> int:
        """SIGKILL the serving process; returns its successor's pid, once there."""
        old = self.server()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                new = self.server()
                if new != old:
                    return new
            except (RuntimeError, OSError):
                pass  # between the two
            if self.proc.poll() is not None:
                raise RuntimeError("the keeper exited (%s):\n%s" % (self.proc.returncode,
                                                                   self.output()))
            if time.monotonic() > deadline:
                raise RuntimeError("no server took over within %ss" % timeout)
            time.sleep(0.005)

    def output(self) -> str:
        if self._output is not None:
            return self._output
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> int | None:
        """Unmount and reap; returns the daemon's exit status."""
        try:
            unmount(self.mountpoint)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc is not None and self._output is None:
                self._output = self.output()
                self.log.close()
        return None if self.proc is None else self.proc.returncode

    def internal_errors(self) -> list[str]:
        return [line for line in self.output().splitlines() if "internal error" in line]

    def __enter__(self) -> RofsProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def rofs_mounted(mountpoint: str, state: str, lower: str | None = None,
                 args: tuple[str, ...] = ()):
    proc = RofsProcess(mountpoint, state, lower, args)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def kill_daemons(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (a state dir): the
    cleanup of a test whose daemon ran where a normal unmount cannot reach it."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if marker.encode() in f.read() and int(pid) != os.getpid():
                    os.kill(int(pid), 9)
        except OSError:
            pass


def run_rofs(*args, code: int | tuple[int, ...] | None = 0, nofile: int | None = None,
             timeout: float = 120, errors: str = "surrogateescape",
             **popen) -> subprocess.CompletedProcess:
    """Run a rofs command of this checkout; arguments may be str, bytes or paths.  Its
    exit code must be `code` (one of them, for a tuple; None: any).  `nofile`: its
    open-file limit, soft and hard.  Output as UTF-8 text, undecodable bytes escaped
    (errors="strict": an error)."""
    limit = [] if nofile is None else ["prlimit", "--nofile=%d:%d" % (nofile, nofile), "--"]
    result = subprocess.run(limit + ROFS + [os.fsdecode(a) for a in args],
                            capture_output=True, encoding="utf-8", errors=errors,
                            timeout=timeout, **popen)
    if code is not None:
        assert result.returncode in (code if isinstance(code, tuple) else (code,)), \
            "rofs %s: exit %d\n%s%s" % (" ".join(map(os.fsdecode, args)), result.returncode,
                                        result.stdout, result.stderr)
    return result


def rofs_out(*args, **kw) -> str:
    """run_rofs's standard output."""
    return run_rofs(*args, **kw).stdout


def fuse_missing() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "mount tests need root"
    return None


def manifest(root: str) -> dict:
    """Everything about every entry below root that must never change in a lower layer:
    type and mode, owner, size, times, inode number, link count, content (read with
    O_NOATIME), symlink target, xattrs.  Directory and symlink atimes are left out:
    listing a directory or reading a link (to build the manifest, or rofs answering
    READLINK, as kernel overlayfs does) may update them, and always does on a
    strictatime filesystem (systemd's tmpfs /tmp)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = b""
            if stat.S_ISREG(st.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
                with os.fdopen(fd, "rb") as f:
                    data = hashlib.sha256(f.read()).digest()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(path).encode(errors="surrogateescape")
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                n: os.getxattr(path, n) for n in os.listxattr(path)}
            atime = None if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) \
                else st.st_atime_ns
            out[os.path.relpath(path, root)] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                atime, st.st_ino, st.st_nlink, data, xattrs)
    return out


class Seen(NamedTuple):
    mode: str
    uid: int
    gid: int
    size: int | None  # None for directories
    nlink: int | None  # None for directories (merged ones report 1, like overlayfs)
    content: str | bytes | None  # digest of a file, target of a symlink
    xattrs: list | None
    mtime: int | None  # only when asked for, and not for directories


def view(root, mtimes: bool = False) -> tuple[dict, list]:
    """What a user sees below root: per entry a Seen, and which names share an inode."""
    entries = {}
    inodes: dict[int, list] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            is_dir = stat.S_ISDIR(st.st_mode)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = None if stat.S_ISLNK(st.st_mode) else sorted(
                (n, os.getxattr(path, n)) for n in os.listxattr(path))
            entries[rel] = Seen(stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                                None if is_dir else st.st_size,
                                None if is_dir else st.st_nlink, content, xattrs,
                                st.st_mtime_ns if mtimes and not is_dir else None)
            if not is_dir:
                inodes.setdefault(st.st_ino, []).append(rel)
    return entries, sorted(sorted(v) for v in inodes.values() if len(v) > 1)


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def write_text(path, text: str, mode: int | None = None) -> None:
    """Write `text` to path (created or emptied), then chmod it to `mode` if given."""
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)


def readb(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_lower(path) -> bytes:
    """Read a lower file without touching its atime (the manifest checks it)."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOATIME), "rb") as f:
        return f.read()


def wait_for_pause(paused) -> None:
    """Until a thread of the daemon is held at a pause point (ROFS_PAUSE_AT, whose
    ROFS_PAUSE_FILE is `paused`, a pathlib.Path)."""
    deadline = time.monotonic() + 30
    while not paused.exists():
        assert time.monotonic() < deadline, "nothing reached the pause point"
        time.sleep(0.01)
