#!/usr/bin/env python3
"""Benchmark rofs side by side with a native directory, kernel overlayfs,
fuse-overlayfs and unionfs-fuse, over the same lower tree.

    python benchmarks/run.py            # full run (several minutes)
    python benchmarks/run.py --quick    # small sizes, one round (CI smoke test)

Every filesystem is mounted fresh (empty upper layer) for every workload in every round,
and rounds interleave the filesystems, so machine noise spreads over all of them.  Cold
workloads drop the kernel's caches first (and run on a fresh mount); where they cannot
be dropped (/proc/sys read-only, as in a container) they are not run, and the output
and the JSON's "not_run" say so.  Reported: the
median time and its spread (min-max) over rounds, the ratio to native, to kernel
overlayfs and to fuse-overlayfs (higher is better: ratio = their time / our time), the
daemon's CPU time and its peak RSS (all its processes: rofs's keeper and server, pages
they share counted once), and, from separate untimed passes, the number of FUSE
requests per operation (kernel tracepoint fuse:fuse_request_send) and each daemon's RSS
before and after walking 100,000 files and after the kernel forgot them.

Results go to stdout (a table), benchmarks/results/latest.json and, when matplotlib is
installed, benchmarks/results/latest.png.  Needs root (mounts, drop_caches).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PEERS = {"fuse-overlayfs": "fuse-overlayfs", "unionfs-fuse": "unionfs-fuse"}


# ---------------------------------------------------------------- the lower tree


@dataclass
class Sizes:
    etc_copies: int  # copies of an /etc-like tree
    small_files: int  # small files (1-4 KiB) spread over directories
    big_mib: int  # the big file for sequential reads and copy-up
    big_dir: int  # entries in the big directory
    open_read: int  # open+read+close iterations
    stats: int  # stat calls
    passwd_cycles: int
    copyup_small: int
    churn: int
    rounds: int
    many_files: int  # files walked by the memory pass (a tree of its own)
    execs: int  # programs run by exec_read_loop
    users: int  # useradd + userdel cycles
    packages: int  # dpkg install + purge cycles


FULL = Sizes(etc_copies=2, small_files=10_000, big_mib=256, big_dir=10_000, open_read=20_000,
             stats=20_000, passwd_cycles=300, copyup_small=1_000, churn=2_000, rounds=3,
             many_files=100_000, execs=300, users=10, packages=10)
QUICK = Sizes(etc_copies=1, small_files=300, big_mib=4, big_dir=300, open_read=300,
              stats=300, passwd_cycles=10, copyup_small=30, churn=30, rounds=1,
              many_files=2_000, execs=10, users=2, packages=2)

# The version of the lower tree's layout: a tree built by an older run.py is rebuilt.
LAYOUT = "2: etc0 is an etckeeper-style git repo, sysroot/etc -> ../etc0"


def _start_tree(root: str) -> bool:
    """Whether the tree at root must be built: False when a complete one is there (its
    `.complete` marker), else root is emptied and True."""
    try:
        with open(os.path.join(root, ".complete")) as f:
            if f.read() == LAYOUT:
                return False
    except OSError:
        pass
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    return True


def _finish_tree(root: str) -> None:
    with open(os.path.join(root, ".complete"), "w") as f:
        f.write(LAYOUT)


def build_lower(root: str, sizes: Sizes) -> None:
    if not _start_tree(root):
        return
    for i in range(sizes.etc_copies):
        subprocess.run(["cp", "-a", "--no-preserve=links", "/etc", os.path.join(root, "etc%d" % i)],
                       check=False, stderr=subprocess.DEVNULL)
    # etckeeper's layout: /etc in git.  And a root for `useradd --prefix`.
    etc = os.path.join(root, "etc0")
    git(etc, "init", "-q")
    git(etc, "add", "-A")
    git(etc, "commit", "-q", "-m", "base")
    os.makedirs(os.path.join(root, "sysroot"))
    os.symlink("../etc0", os.path.join(root, "sysroot", "etc"))
    small = os.path.join(root, "small")
    for i in range(sizes.small_files):
        d = os.path.join(small, "d%02d" % (i % 50))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(os.urandom(1024 + (i * 37) % 3072))
    big_dir = os.path.join(root, "bigdir")
    os.makedirs(big_dir)
    for i in range(sizes.big_dir):
        with open(os.path.join(big_dir, "entry-%05d" % i), "w") as f:
            f.write("x")
    with open(os.path.join(root, "passwd"), "w") as f:
        f.write("".join("user%d:x:%d:%d::/home/user%d:/bin/sh\n" % (i, 1000 + i, 1000 + i, i)
                        for i in range(40)))
    with open(os.path.join(root, "big"), "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(sizes.big_mib):
            f.write(chunk)
    _finish_tree(root)


def git(repo: str, *args: str) -> None:
    subprocess.run(["git", "-C", repo, "-c", "user.name=bench", "-c", "user.email=b@bench",
                    "-c", "core.fileMode=true", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def build_many(root: str, files: int) -> None:
    """The memory pass's tree: `files` empty files, 1,000 per directory."""
    if not _start_tree(root):
        return
    for i in range(files):
        d = os.path.join(root, "d%03d" % (i // 1000))
        if i % 1000 == 0:
            os.makedirs(d)
        os.close(os.open(os.path.join(d, "f%04d" % (i % 1000)), os.O_CREAT | os.O_WRONLY, 0o644))
    _finish_tree(root)


# ---------------------------------------------------------------- filesystems


def mounted_fstype(path: str) -> str | None:
    fstype = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                fstype = fields[fields.index("-") + 1]
    return fstype


def wait_mounted(path: str, fstype: str, proc: subprocess.Popen | None, timeout=30) -> None:
    deadline = time.monotonic() + timeout
    while mounted_fstype(path) != fstype:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited before mounting" % fstype)
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not mount" % fstype)
        time.sleep(0.01)
    os.stat(path)


class Filesystem:
    name = ""
    fuse = True
    only: frozenset[str] | None = None  # the workloads it runs (None: all)

    def __init__(self, lower: str, scratch: str) -> None:
        self.lower = lower
        self.scratch = scratch
        self.proc: subprocess.Popen | None = None
        self.mnt = ""

    def available(self) -> str | None:
        return None

    def mount(self, writable: bool) -> str:
        raise NotImplementedError

    def unmount(self) -> None:
        if self.mnt and mounted_fstype(self.mnt):
            if subprocess.run(["umount", self.mnt], capture_output=True).returncode:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.scratch, ignore_errors=True)

    def fresh(self) -> tuple[str, str, str]:
        shutil.rmtree(self.scratch, ignore_errors=True)
        upper, work, mnt = (os.path.join(self.scratch, n) for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            os.makedirs(d)
        self.mnt = mnt
        return upper, work, mnt

    def _pids(self) -> list[int]:
        """The daemon's processes: the one started and its children (rofs: the keeper
        and its server)."""
        pid = self.proc.pid
        try:
            with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                return [pid] + [int(c) for c in f.read().split()]
        except OSError:
            return [pid]

    def cpu_seconds(self) -> float | None:
        if self.proc is None:
            return None
        total = 0.0
        try:
            for pid in self._pids():
                with open("/proc/%d/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None
        return total

    def peak_rss_kib(self) -> int | None:
        """The serving process's peak, and what the others hold of their own (a fork
        shares its parent's pages until it writes them)."""
        if self.proc is None:
            return None
        pids = self._pids()
        peak = _kib("/proc/%d/status" % pids[-1], "VmHWM:")
        if peak is None:
            return None
        return peak + sum(_private_kib(pid) or 0 for pid in pids[:-1])

    def rss_kib(self) -> int | None:
        """Memory the daemon's processes hold, shared pages counted once (Pss)."""
        if self.proc is None:
            return None
        sizes = [_kib("/proc/%d/smaps_rollup" % pid, "Pss:") for pid in self._pids()]
        return None if None in sizes else sum(sizes)


def _kib(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _private_kib(pid: int) -> int | None:
    clean = _kib("/proc/%d/smaps_rollup" % pid, "Private_Clean:")
    dirty = _kib("/proc/%d/smaps_rollup" % pid, "Private_Dirty:")
    return None if clean is None or dirty is None else clean + dirty


class Native(Filesystem):
    name = "native"
    fuse = False

    def mount(self, writable: bool) -> str:
        if not writable:
            self.mnt = ""
            return self.lower
        _, _, mnt = self.fresh()
        os.rmdir(mnt)
        subprocess.run(["cp", "-a", "--reflink=auto", self.lower, mnt], check=True)
        self.mnt = ""
        return mnt


class KernelOverlay(Filesystem):
    name = "kernel-overlayfs"
    fuse = False

    def mount(self, writable: bool) -> str:
        upper, work, mnt = self.fresh()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        "lowerdir=%s,upperdir=%s,workdir=%s" % (self.lower, upper, work), mnt],
                       check=True)
        return mnt


class FuseOverlayfs(Filesystem):
    name = "fuse-overlayfs"

    def available(self) -> str | None:
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed"

    def mount(self, writable: bool) -> str:
        upper, work, mnt = self.fresh()
        self.proc = subprocess.Popen(
            ["fuse-overlayfs", "-f", "-o", "lowerdir=%s,upperdir=%s,workdir=%s" % (
                self.lower, upper, work), mnt], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_mounted(mnt, "fuse.fuse-overlayfs", self.proc)
        return mnt


class UnionfsFuse(Filesystem):
    name = "unionfs-fuse"

    def available(self) -> str | None:
        return None if shutil.which("unionfs") else "unionfs-fuse not installed"

    def mount(self, writable: bool) -> str:
        upper, _, mnt = self.fresh()
        self.proc = subprocess.Popen(
            ["unionfs", "-f", "-o", "cow,use_ino", "%s=RW:%s=RO" % (upper, self.lower), mnt],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(mnt, "fuse.unionfs", self.proc)
        return mnt


class Rofs(Filesystem):
    name = "rofs"
    options: tuple[str, ...] = ()

    def mount(self, writable: bool) -> str:
        _, _, mnt = self.fresh()
        state = os.path.join(self.scratch, "state")
        self.proc = subprocess.Popen([sys.executable, "-m", "rofs", mnt, "--lower", self.lower,
                                      "--state", state, "-f", *self.options],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(mnt, "fuse.rofs", self.proc)
        return mnt


class RofsNoLog(Rofs):
    """rofs without its write log, on the workloads that make changes: what the log
    costs (the goal: the passwd cycle within 10% of this)."""

    name = "rofs-nolog"
    options = ("--no-log",)
    only = frozenset({"passwd_cycle", "copyup_small", "churn", "etckeeper_commit",
                      "useradd_cycle", "dpkg_cycle"})


class RofsNoOpen(Rofs):
    """rofs --no-open: the kernel opens files itself (FUSE no_open), so a cached
    open+read+close costs no request; every workload."""

    name = "rofs-noopen"
    options = ("--no-open",)


ALL_FS = [Native, KernelOverlay, FuseOverlayfs, UnionfsFuse, Rofs, RofsNoOpen, RofsNoLog]


def ensure_peers(wanted: list[str] | None) -> list[str]:
    """Install the selected peer FUSE overlays when missing (Debian: apt-get update, then
    install); returns the ones still missing."""
    peers = [(binary, pkg) for binary, pkg in (("fuse-overlayfs", "fuse-overlayfs"),
                                               ("unionfs", "unionfs-fuse"))
             if wanted is None or pkg in wanted]
    missing = [pkg for binary, pkg in peers if not shutil.which(binary)]
    if missing and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [pkg for binary, pkg in peers if not shutil.which(binary)]


# ---------------------------------------------------------------- request counting


class RequestCounter:
    """Counts FUSE requests per opcode with the kernel's fuse:fuse_request_send
    tracepoint, filtered on one connection.  Used in a separate, untimed pass.

    It traces in an instance of its own (tracefs instances/), with its own ring buffer,
    removed at the end: the machine's global trace buffer, its size and its events are
    left as they were."""

    TRACING = "/sys/kernel/tracing"
    EVENT = "events/fuse/fuse_request_send"

    def __init__(self) -> None:
        self.mounted_here = False
        self.reason: str | None = None
        self.instance: str | None = None
        if not os.path.isdir(os.path.join(self.TRACING, "events")):
            if subprocess.run(["mount", "-t", "tracefs", "nodev", self.TRACING],
                              capture_output=True).returncode == 0:
                self.mounted_here = True
        if not os.path.isdir(os.path.join(self.TRACING, self.EVENT)):
            self.reason = "no fuse:fuse_request_send tracepoint (kernel too old or no tracefs)"
            return
        instance = os.path.join(self.TRACING, "instances", "rofs-bench-%d" % os.getpid())
        try:
            os.mkdir(instance)
        except OSError as e:
            self.reason = "no tracefs instance (%s)" % e.strerror
            return
        self.instance = instance
        self._write("buffer_size_kb", "65536")

    def _path(self, name: str) -> str:
        return os.path.join(self.instance, name)

    def _read(self, name: str) -> str:
        with open(self._path(name)) as f:
            return f.read()

    def _write(self, name: str, value: str) -> None:
        with open(self._path(name), "w") as f:
            f.write(value)

    def start(self, mountpoint: str) -> None:
        dev = os.stat(mountpoint).st_dev
        self._write(self.EVENT + "/filter", "connection == %d" % os.minor(dev))
        self._write("trace", "")
        self._write(self.EVENT + "/enable", "1")

    def stop(self) -> tuple[dict[str, int], bool]:
        """Counts per opcode name, and whether the buffer overflowed (counts too low)."""
        self._write(self.EVENT + "/enable", "0")
        counts: dict[str, int] = {}
        with open(self._path("trace")) as f:
            for line in f:
                start = line.find("opcode ")
                if start < 0:
                    continue
                name = line[line.find("(", start) + 1:line.find(")", start)]
                counts[name.replace("FUSE_", "").lower()] = counts.get(
                    name.replace("FUSE_", "").lower(), 0) + 1
        overrun = any(int(line.split()[-1]) for cpu in os.listdir(self._path("per_cpu"))
                      for line in self._read("per_cpu/%s/stats" % cpu).splitlines()
                      if line.startswith("overrun"))
        return counts, overrun

    def close(self) -> None:
        if self.instance is not None:
            try:
                self._write(self.EVENT + "/enable", "0")
            except OSError:
                pass
            os.rmdir(self.instance)  # its buffer and events go with it
            self.instance = None
        if self.mounted_here:
            subprocess.run(["umount", self.TRACING], capture_output=True)


# ---------------------------------------------------------------- workloads


DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def cold_caches_missing() -> str | None:
    """Why caches cannot be dropped here (a cold workload then measures nothing cold),
    or None."""
    if os.access(DROP_CACHES, os.W_OK):
        return None
    return "no cold caches here: %s is read-only (a container?)" % DROP_CACHES


def walk(root: str) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def small_files(root: str) -> list[str]:
    out = []
    small = os.path.join(root, "small")
    for d in sorted(os.listdir(small)):
        out += [os.path.join(small, d, f) for f in sorted(os.listdir(os.path.join(small, d)))]
    return out


def read_all(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            f.read()


def seq_read(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def open_read_close(path: str, n: int) -> None:
    for _ in range(n):
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 65536)
        os.close(fd)


def passwd_cycle(root: str, n: int) -> None:
    block = b"p" * 4096
    target = os.path.join(root, "passwd")
    for i in range(n):
        tmp = os.path.join(root, "npasswd")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, target)
        mine = os.path.join(root, "passwd.%d" % i)
        fd = os.open(mine, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        os.link(mine, os.path.join(root, "passwd.lock"))
        os.unlink(os.path.join(root, "passwd.lock"))
        os.unlink(mine)


def copy_up(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"+")
        os.close(fd)


def churn(root: str, n: int) -> None:
    d = os.path.join(root, "churn")
    os.mkdir(d)
    for i in range(n):
        p = os.path.join(d, "f%d" % i)
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        os.unlink(p)
        q = os.path.join(d, "d%d" % i)
        os.mkdir(q)
        os.rmdir(q)


# Admin work on an /etc copy (etc0), each step a real program.

def quiet(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def exec_read_loop(root: str, n: int) -> None:
    """What each exec of a small admin tool does to /etc: read passwd, group and
    nsswitch.conf (the tool itself comes from the real root)."""
    etc = os.path.join(root, "etc0")
    files = [os.path.join(etc, f) for f in ("passwd", "group", "nsswitch.conf")]
    for _ in range(n):
        quiet("cat", *files)


def find_cat(root: str) -> None:
    quiet("find", os.path.join(root, "etc0"), "-path", "*/.git", "-prune", "-o", "-type",
          "f", "-exec", "cat", "{}", "+")


def etckeeper_commit(root: str) -> None:
    etc = os.path.join(root, "etc0")
    with open(os.path.join(etc, "motd"), "a") as f:
        f.write("changed by the benchmark\n")
    git(etc, "add", "-A")
    git(etc, "commit", "-q", "-m", "change")


def useradd_cycle(root: str, n: int) -> None:
    sysroot = os.path.join(root, "sysroot")
    for i in range(n):
        quiet("useradd", "--prefix", sysroot, "benchuser%d" % i)
        quiet("userdel", "--prefix", sysroot, "benchuser%d" % i)


PACKAGE = "rofs-bench-conf"
CONFFILES = 20


def build_deb(where: str) -> str:
    """A package of CONFFILES configuration files under /etc (conffiles, as a daemon's
    package ships them), built once with dpkg-deb; its path."""
    deb = os.path.join(where, PACKAGE + ".deb")
    if os.path.exists(deb):
        return deb
    tree = os.path.join(where, PACKAGE)
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(os.path.join(tree, "DEBIAN"))
    conffiles = []
    for i in range(CONFFILES):
        rel = "etc/%s/conf.d/%02d.conf" % (PACKAGE, i)
        os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
        with open(os.path.join(tree, rel), "w") as f:
            f.write("# setting %d\nkey%d = value\n" % (i, i) * 20)
        conffiles.append("/" + rel)
    with open(os.path.join(tree, "DEBIAN", "control"), "w") as f:
        f.write("Package: %s\nVersion: 1.0\nArchitecture: all\nMaintainer: rofs "
                "<rofs@localhost>\nDescription: configuration files for a benchmark\n"
                % PACKAGE)
    with open(os.path.join(tree, "DEBIAN", "conffiles"), "w") as f:
        f.write("\n".join(conffiles) + "\n")
    quiet("dpkg-deb", "--root-owner-group", "--build", tree, deb)
    return deb


def dpkg_admindir(where: str) -> str:
    """A fresh, empty dpkg database (on the native filesystem: only /etc is measured)."""
    admin = os.path.join(where, "dpkg-admin")
    shutil.rmtree(admin, ignore_errors=True)
    for sub in ("info", "updates", "triggers"):
        os.makedirs(os.path.join(admin, sub))
    for name in ("status", "available"):
        open(os.path.join(admin, name), "w").close()
    return admin


def dpkg_cycle(root: str, deb: str, admin: str, n: int) -> None:
    """dpkg -i of the package into the /etc copy (through sysroot/etc), then --purge."""
    dpkg = ["dpkg", "--instdir", os.path.join(root, "sysroot"), "--admindir", admin,
            "--force-script-chrootless", "--force-not-root"]
    for _ in range(n):
        quiet(*dpkg, "-i", deb)
        quiet(*dpkg, "--purge", PACKAGE)


def two_processes(root: str, n: int) -> None:
    path = os.path.join(root, "passwd")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(_worker, [(path, small_files(root)[: n // 4], n), ] * 2)


def _worker(path: str, files: list[str], n: int) -> None:
    open_read_close(path, n)
    for p in files:
        os.stat(p)


@dataclass
class Workload:
    name: str
    what: str
    writable: bool = False
    cold: bool = False
    ops: int = 1
    run: object = None  # (root, sizes) -> None
    prepare: object = None  # (root, sizes) -> state passed to run
    extra: dict = field(default_factory=dict)


def workloads(sizes: Sizes, work: str) -> list[Workload]:
    """The workloads; `work` is a native directory of the run's own (the dpkg package
    and database)."""
    return [
        Workload("walk_cold", "walk + lstat of the tree, cold caches", cold=True,
                 run=lambda r, s, p: walk(r)),
        Workload("walk_hot", "walk + lstat, second time", prepare=lambda r, s: walk(r),
                 run=lambda r, s, p: walk(r)),
        Workload("open_read_close", "%d x open+read+close of a passwd-sized file"
                 % sizes.open_read, prepare=lambda r, s: open_read_close(
                     os.path.join(r, "passwd"), 1),
                 run=lambda r, s, p: open_read_close(os.path.join(r, "passwd"), s.open_read),
                 ops=sizes.open_read),
        Workload("stat_fixed", "%d x stat of a fixed set of 100 paths" % sizes.stats,
                 prepare=lambda r, s: small_files(r)[:100],
                 run=lambda r, s, p: [os.stat(x) for _ in range(s.stats // 100) for x in p],
                 ops=sizes.stats),
        Workload("read_small_cold", "read %d small files, cold" % sizes.small_files, cold=True,
                 prepare=lambda r, s: small_files(r), run=lambda r, s, p: read_all(p),
                 ops=sizes.small_files),
        Workload("read_small_warm", "read %d small files, warm" % sizes.small_files,
                 prepare=lambda r, s: (lambda files: (read_all(files), files)[1])(
                     small_files(r)),
                 run=lambda r, s, p: read_all(p), ops=sizes.small_files),
        Workload("seq_read_cold", "%d MiB sequential read, cold" % sizes.big_mib, cold=True,
                 run=lambda r, s, p: seq_read(os.path.join(r, "big"))),
        Workload("seq_read_warm", "%d MiB sequential read, warm" % sizes.big_mib,
                 prepare=lambda r, s: seq_read(os.path.join(r, "big")),
                 run=lambda r, s, p: seq_read(os.path.join(r, "big"))),
        Workload("passwd_cycle", "%d x passwd cycle (tmp+4KiB+fsync+rename+link lock)"
                 % sizes.passwd_cycles, writable=True,
                 run=lambda r, s, p: passwd_cycle(r, s.passwd_cycles), ops=sizes.passwd_cycles),
        Workload("copyup_small", "copy-up of %d small lower files" % sizes.copyup_small,
                 writable=True, prepare=lambda r, s: small_files(r)[: s.copyup_small],
                 run=lambda r, s, p: copy_up(p), ops=sizes.copyup_small),
        Workload("copyup_big", "copy-up of the %d MiB file" % sizes.big_mib, writable=True,
                 run=lambda r, s, p: copy_up([os.path.join(r, "big")])),
        Workload("churn", "%d x create+unlink and mkdir+rmdir" % sizes.churn, writable=True,
                 run=lambda r, s, p: churn(r, s.churn), ops=sizes.churn),
        Workload("readdir_10k_first", "first listing of a %d-entry directory" % sizes.big_dir,
                 run=lambda r, s, p: os.listdir(os.path.join(r, "bigdir"))),
        Workload("readdir_10k_again", "second listing of it",
                 prepare=lambda r, s: os.listdir(os.path.join(r, "bigdir")),
                 run=lambda r, s, p: os.listdir(os.path.join(r, "bigdir"))),
        Workload("two_processes", "2 processes: open+read+close and stat, at once",
                 run=lambda r, s, p: two_processes(r, s.open_read), ops=2 * sizes.open_read),
        # Admin work on the /etc copy.
        Workload("exec_read_loop", "%d x exec of cat reading passwd, group, nsswitch.conf"
                 % sizes.execs, prepare=lambda r, s: exec_read_loop(r, 1),
                 run=lambda r, s, p: exec_read_loop(r, s.execs), ops=sizes.execs),
        Workload("ls_lR_hot", "ls -lR of the /etc copy, second time",
                 prepare=lambda r, s: quiet("ls", "-lR", os.path.join(r, "etc0")),
                 run=lambda r, s, p: quiet("ls", "-lR", os.path.join(r, "etc0"))),
        Workload("find_cat_hot", "find -type f -exec cat + over the /etc copy, second time",
                 prepare=lambda r, s: find_cat(r), run=lambda r, s, p: find_cat(r)),
        Workload("git_status_hot", "git status in the /etc git repo (etckeeper), second time",
                 writable=True, prepare=lambda r, s: git(os.path.join(r, "etc0"), "status"),
                 run=lambda r, s, p: git(os.path.join(r, "etc0"), "status")),
        Workload("etckeeper_commit", "edit + git add -A + git commit in the /etc repo",
                 writable=True, run=lambda r, s, p: etckeeper_commit(r)),
        Workload("useradd_cycle", "%d x useradd + userdel (--prefix) in the /etc copy"
                 % sizes.users, writable=True, run=lambda r, s, p: useradd_cycle(r, s.users),
                 ops=sizes.users),
        Workload("dpkg_cycle", "%d x dpkg -i + --purge of a package of %d conffiles into "
                 "the /etc copy" % (sizes.packages, CONFFILES), writable=True,
                 prepare=lambda r, s: (build_deb(work), dpkg_admindir(work)),
                 run=lambda r, s, p: dpkg_cycle(r, *p, s.packages), ops=sizes.packages),
    ]


# ---------------------------------------------------------------- running


def run(args) -> dict:
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes.rounds = args.rounds
    base = args.workdir or os.path.join(tempfile.gettempdir(), "rofs-bench-%s" % (
        "quick" if args.quick else "full"))
    work = os.path.join(base, "work")
    os.makedirs(work, exist_ok=True)
    lower = os.path.join(base, "lower")
    build_lower(lower, sizes)
    notes = []
    missing = ensure_peers(args.only)
    for pkg in missing:
        notes.append("%s is not installed and could not be installed: skipped" % pkg)
    systems = []
    for cls in ALL_FS:
        if args.only and cls.name not in args.only:
            continue
        fs = cls(lower, os.path.join(base, "mnt-" + cls.name))
        reason = fs.available()
        if reason:
            notes.append("%s skipped: %s" % (cls.name, reason))
            continue
        systems.append(fs)
    chosen = [w for w in workloads(sizes, work)
              if not args.workloads or w.name in args.workloads]
    no_cold = cold_caches_missing()
    not_run = {w.name: no_cold for w in chosen if w.cold and no_cold}
    if not_run:
        notes.append("not run: %s (%s)" % (", ".join(not_run), no_cold))
        chosen = [w for w in chosen if w.name not in not_run]
    samples: dict[str, dict[str, list[float]]] = {w.name: {} for w in chosen}
    cpu: dict[str, dict[str, list[float]]] = {w.name: {} for w in chosen}
    rss: dict[str, int] = {}
    for round_no in range(sizes.rounds):
        for w in chosen:
            order = systems if round_no % 2 == 0 else list(reversed(systems))
            for fs in order:
                if fs.only is not None and w.name not in fs.only:
                    continue
                root = fs.mount(w.writable)
                try:
                    prepared = w.prepare(root, sizes) if w.prepare else None
                    if w.cold:
                        drop_caches()
                    cpu0 = fs.cpu_seconds()
                    watchdog = Watchdog(fs)
                    t0 = time.perf_counter()
                    try:
                        w.run(root, sizes, prepared)
                    except Exception:  # an aborted mount fails the workload
                        if not watchdog.fired:
                            raise
                        notes.append("%s hung in %s (round %d): aborted after %d s, no "
                                     "sample" % (fs.name, w.name, round_no + 1, HANG_SECONDS))
                        continue
                    finally:
                        watchdog.stop()
                    elapsed = time.perf_counter() - t0
                    cpu1 = fs.cpu_seconds()
                    samples[w.name].setdefault(fs.name, []).append(elapsed)
                    if cpu0 is not None and cpu1 is not None:
                        cpu[w.name].setdefault(fs.name, []).append(cpu1 - cpu0)
                    peak = fs.peak_rss_kib()
                    if peak:
                        rss[fs.name] = max(rss.get(fs.name, 0), peak)
                finally:
                    fs.unmount()
                if not args.json_only:
                    print("round %d %-18s %-16s %8.3fs" % (round_no + 1, w.name, fs.name,
                                                          elapsed), file=sys.stderr)
    fuse_systems = [fs for fs in systems if fs.fuse]
    requests = count_requests(chosen, fuse_systems, sizes, notes,
                              args) if not args.no_requests else {}
    memory = memory_pass(fuse_systems, os.path.join(base, "many"), sizes) \
        if not args.no_memory else {}
    if memory and no_cold:
        notes.append("daemon memory after the kernel forgot the nodes not measured (%s)"
                     % no_cold)
    return report(chosen, systems, samples, cpu, rss, requests, memory, sizes, notes,
                  not_run, args)


# A timed workload still running after this long is taken as hung (a peer's deadlock:
# unionfs-fuse once stopped answering an ioctl): its FUSE connection is aborted, the
# sample dropped, and a note says so, so one stuck daemon does not stall the run.
HANG_SECONDS = 600


class Watchdog:
    """Kills the FUSE daemon of `fs` (which fails its pending requests) if `HANG_SECONDS`
    pass before `stop()`; `fired` tells whether it did."""

    def __init__(self, fs) -> None:
        self.fired = False
        self._proc = fs.proc if fs.fuse else None
        self._timer = None
        if self._proc is not None:
            self._timer = threading.Timer(HANG_SECONDS, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        self._proc.kill()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def memory_pass(systems, many: str, sizes: Sizes) -> dict:
    """Each FUSE daemon's RSS before and after walking a tree of `sizes.many_files`
    files, and after the kernel dropped its dentries and inodes (which sends FORGET for
    every node): does the daemon give the memory back?  (None where the caches cannot
    be dropped.)"""
    build_many(many, sizes.many_files)
    out = {}
    for proto in systems:
        if proto.only is not None:
            continue
        fs = type(proto)(many, proto.scratch)
        root = fs.mount(False)
        try:
            idle = fs.rss_kib()
            walked = walk(root)
            after_walk = fs.rss_kib()
            after_forget = None
            if cold_caches_missing() is None:
                os.sync()
                with open(DROP_CACHES, "w") as f:
                    f.write("2\n")
                after_forget = settled_rss(fs)
        finally:
            fs.unmount()
        out[fs.name] = {"entries": walked, "idle_kib": idle, "after_walk_kib": after_walk,
                        "after_forget_kib": after_forget}
    return out


def settled_rss(fs: Filesystem, timeout: float = 10.0) -> int | None:
    """The daemon's RSS once it stopped changing (FORGETs arrive asynchronously)."""
    last, deadline = fs.rss_kib(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = fs.rss_kib()
        if now == last:
            break
        last = now
    return last


def count_requests(chosen, systems, sizes, notes, args) -> dict:
    """One untimed pass per FUSE filesystem and workload, counting its FUSE requests."""
    counter = RequestCounter()
    out: dict[str, dict[str, dict]] = {w.name: {} for w in chosen}
    try:
        if counter.reason:
            notes.append("FUSE requests not counted: " + counter.reason)
            return {}
        for w in chosen:
            for fs in systems:
                if fs.only is not None:
                    continue  # a variant: its requests are those of the full filesystem
                root = fs.mount(w.writable)
                try:
                    prepared = w.prepare(root, sizes) if w.prepare else None
                    if w.cold:
                        drop_caches()
                    counter.start(root)
                    w.run(root, sizes, prepared)
                    counts, overrun = counter.stop()
                finally:
                    fs.unmount()
                out[w.name][fs.name] = {"total": sum(counts.values()), "by_opcode": counts,
                                        "per_op": sum(counts.values()) / w.ops,
                                        "overflowed": overrun}
    finally:
        counter.close()
    return out


def report(chosen, systems, samples, cpu, rss, requests, memory, sizes, notes, not_run,
           args) -> dict:
    names = [fs.name for fs in systems]
    rows = []
    for w in chosen:
        row = {"workload": w.name, "what": w.what, "ops": w.ops, "results": {}}
        for name in names:
            times = samples[w.name].get(name)
            if not times:
                continue
            med = statistics.median(times)
            row["results"][name] = {
                "median_s": med, "min_s": min(times), "max_s": max(times),
                "per_op_us": med / w.ops * 1e6,
                "daemon_cpu_s": statistics.median(cpu[w.name][name])
                if cpu[w.name].get(name) else None,
                "fuse_requests": requests.get(w.name, {}).get(name)}
        for res in row["results"].values():
            for ref in ("native", "kernel-overlayfs", "fuse-overlayfs"):
                if ref in row["results"]:
                    res["ratio_to_" + ref] = row["results"][ref]["median_s"] / res["median_s"]
        if "rofs" in row["results"] and "rofs-nolog" in row["results"]:
            # What the write log costs: > 1 means slower with it.
            row["results"]["rofs"]["log_cost"] = (row["results"]["rofs"]["median_s"] /
                                                  row["results"]["rofs-nolog"]["median_s"])
        rows.append(row)
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
            "kernel": platform.release(), "cpus": os.cpu_count(), "quick": args.quick,
            "rounds": sizes.rounds, "filesystems": names, "notes": notes,
            "not_run": not_run,
            "peak_rss_kib": rss, "memory": memory, "workloads": rows}
    print_table(data)
    results = args.results or RESULTS
    os.makedirs(results, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    with open(os.path.join(results, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    chart(data, os.path.join(results, stem + ".png"))
    return data


def print_table(data: dict) -> None:
    names = data["filesystems"]
    print("\nmedian seconds (min-max over %d rounds); x = speed relative to native "
          "(1.0 = as fast)" % data["rounds"])
    header = "%-18s" % "workload" + "".join("%30s" % n for n in names)
    print(header)
    for row in data["workloads"]:
        line = "%-18s" % row["workload"]
        for n in names:
            r = row["results"].get(n)
            if r is None:
                line += "%30s" % "-"
                continue
            ratio = r.get("ratio_to_native")
            line += "%30s" % ("%.4f (%.4f-%.4f) %s" % (
                r["median_s"], r["min_s"], r["max_s"],
                "x%.2f" % ratio if ratio is not None else ""))
        print(line)
    for ours in ("rofs", "rofs-noopen"):
        if ours not in names:
            continue
        print("\n%s vs peers (their time / its time; >= 1 means as fast or faster):" % ours)
        for row in data["workloads"]:
            r = row["results"].get(ours)
            if not r:
                continue
            parts = ["%s %.2f" % (ref, r["ratio_to_" + ref]) for ref in
                     ("kernel-overlayfs", "fuse-overlayfs") if "ratio_to_" + ref in r]
            cpu = r.get("daemon_cpu_s")
            if "log_cost" in r:
                parts.append("with the write log %.2fx the time without" % r["log_cost"])
            print("  %-18s %s%s" % (row["workload"], ", ".join(parts),
                                    "  (daemon CPU %.3fs)" % cpu if cpu is not None else ""))
    if any(r["results"].get("rofs", {}).get("fuse_requests") for r in data["workloads"]):
        fuse_names = [n for n in names if n in ("fuse-overlayfs", "unionfs-fuse", "rofs",
                                                "rofs-noopen")]
        print("\nFUSE requests per operation (untimed pass):")
        print("%-18s" % "workload" + "".join("%16s" % n for n in fuse_names))
        for row in data["workloads"]:
            line = "%-18s" % row["workload"]
            for n in fuse_names:
                req = row["results"].get(n, {}).get("fuse_requests")
                line += "%16s" % ("-" if not req else "%.2f%s" % (
                    req["per_op"], "+" if req["overflowed"] else ""))
            print(line)
    if data["peak_rss_kib"]:
        print("\npeak daemon RSS: " + ", ".join("%s %d MiB" % (k, v // 1024)
                                                for k, v in data["peak_rss_kib"].items()))
    if data.get("memory"):
        print("\ndaemon RSS walking a tree of its own (untimed): idle -> after the walk -> "
              "after the kernel forgot the nodes (drop_caches):")
        for name, m in data["memory"].items():
            print("  %-16s %d entries: %s -> %s -> %s MiB" % (
                name, m["entries"], *(("%.0f" % (m[k] / 1024)) if m[k] else "?"
                                      for k in ("idle_kib", "after_walk_kib",
                                                "after_forget_kib"))))
    for note in data["notes"]:
        print("note:", note)


def chart(data: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed, no chart", file=sys.stderr)
        return
    names = [n for n in data["filesystems"] if n != "native"]
    rows = [r for r in data["workloads"] if "native" in r["results"]]
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [r["results"].get(name, {}).get("ratio_to_native", 0) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["workload"] for r in rows], rotation=40, ha="right")
    ax.set_ylabel("speed relative to native (higher is better)")
    ax.set_yscale("log")
    ax.set_title("rofs benchmark %s (%s)" % (data["date"], "quick" if data["quick"] else
                                             "%d rounds" % data["rounds"]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--only", type=lambda s: s.split(","),
                        help="comma-separated filesystems, e.g. native,rofs")
    parser.add_argument("--workloads", type=lambda s: s.split(","),
                        help="comma-separated workload names")
    parser.add_argument("--workdir", help="where to build the lower tree and mount")
    parser.add_argument("--results", help="output directory (default benchmarks/results)")
    parser.add_argument("--no-requests", action="store_true",
                        help="skip the untimed pass that counts FUSE requests")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the untimed pass that measures daemon memory over a walk "
                        "of 100,000 files")
    parser.add_argument("--json-only", action="store_true", help="no per-run progress")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/run.py: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
