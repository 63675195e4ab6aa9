"""Mounting rofs from tests: one helper used by the pytest fixtures and by the scripts
that run inside private mount namespaces.

A mount is started in the foreground as a subprocess, awaited until it shows up in
/proc/self/mountinfo (failing at once if the process died), and always torn down:
`fusermount3 -u`, lazily if it must, then the process is reaped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

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
    if subprocess.run(["fusermount3", "-u", path], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
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


def fuse_missing() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "mount tests need root"
    return None
