#!/usr/bin/env python3
"""Root's service while one user attacks: the worst latency of root's stat, open and
passwd cycle (write nshadow, fsync, rename over shadow) while an unprivileged user
(uid 65534) runs each attack of docs/reliability.md, through rofs and on the native
filesystem under the same load, in one run.

    python3 benchmarks/attacks.py [--seconds 10] [--names 200000] [--copies 64]
                                  [--copy-mib 64] [--json FILE]

Attacks (each as the user would run it, in a world-writable sticky directory):
  enotempty   4 threads: rmdir(big) and rename(empty, big) on a directory of --names
  listing     --no-open: 8 threads listing that directory, one making names elsewhere
  lseek       lseek(fd, -1, SEEK_DATA) as fast as one process can
  copies      --copies threads, each a copy_file_range of --copy-mib MiB
  log-flood   a 3.9 KB command line making create/unlink pairs as fast as it can
Needs root (setpriv to uid 65534, mounting).  Prints one line per attack and
filesystem: the worst and the median of each of root's probes, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from benchmarks.run import wait_mounted  # noqa: E402

NOBODY = 65534
PYTHON = "/usr/bin/python3"  # one every user can run

ATTACKS = {
    "enotempty": """
import errno, os, sys, threading, time
d, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
os.makedirs(os.path.join(d, "empty"), exist_ok=True)
def loop():
    while time.monotonic() < end:
        for call in (lambda: os.rmdir(os.path.join(d, "big")),
                     lambda: os.rename(os.path.join(d, "empty"), os.path.join(d, "big"))):
            try:
                call()
            except OSError as e:
                assert e.errno == errno.ENOTEMPTY, e
threads = [threading.Thread(target=loop) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
""",
    "listing": """
import os, sys, threading, time
d, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
def read():
    while time.monotonic() < end:
        for _ in os.scandir(os.path.join(d, "big")):
            pass
def churn():
    n = 0
    while time.monotonic() < end:
        p = os.path.join(d, "churn%d" % n)
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
        os.unlink(p)
        n += 1
        time.sleep(0.01)
threads = [threading.Thread(target=read) for _ in range(8)] + [threading.Thread(target=churn)]
[t.start() for t in threads]
[t.join() for t in threads]
""",
    "lseek": """
import os, sys, time
d, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
fd = os.open(os.path.join(d, "seek"), os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, b"x" * 4096)
while time.monotonic() < end:
    try:
        os.lseek(fd, -1, os.SEEK_DATA)
    except OSError:
        pass
""",
    "copies": """
import os, sys, threading, time
d, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
count, size = int(sys.argv[3]), int(sys.argv[4]) << 20
def copy(i):
    src = os.path.join(d, "src%d" % i)
    while time.monotonic() < end:
        s = os.open(src, os.O_RDONLY)
        t = os.open(os.path.join(d, "dst%d" % i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        done = 0
        while done < size and time.monotonic() < end:
            n = os.copy_file_range(s, t, size - done, done, done)
            if not n:
                break
            done += n
        os.close(s)
        os.close(t)
threads = [threading.Thread(target=copy, args=(i,)) for i in range(count)]
[t.start() for t in threads]
[t.join() for t in threads]
""",
    "log-flood": """
import os, sys, time
d, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    p = os.path.join(d, "f%d" % n)
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
    os.unlink(p)
    n += 1
""",
}


def build(root: str, names: int, copies: int, copy_mib: int) -> None:
    """The tree both sides start from: shadow, a sticky world-writable pub with the
    user's big directory and the copies' sources."""
    os.makedirs(root)
    os.chmod(root, 0o755)
    with open(os.path.join(root, "shadow"), "w") as f:
        f.write("root:*:19000:0:99999:7:::\n" * 40)
    pub = os.path.join(root, "pub")
    os.mkdir(pub)
    os.chmod(pub, 0o1777)
    big = os.path.join(pub, "big")
    os.mkdir(big)
    for i in range(names):
        os.close(os.open(os.path.join(big, "n%07d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    chunk = os.urandom(1 << 20)
    for i in range(copies):
        path = os.path.join(pub, "src%d" % i)
        with open(path, "wb") as f:
            for _ in range(copy_mib):
                f.write(chunk)
        os.chown(path, NOBODY, NOBODY)
    os.chown(big, NOBODY, NOBODY)


class Probe(threading.Thread):
    """Root's requests, one after another until stopped, each timed."""

    def __init__(self, root: str) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.times: dict[str, list[float]] = {"stat": [], "open": [], "passwd": []}
        self.stopping = threading.Event()

    def run(self) -> None:
        shadow = os.path.join(self.root, "shadow")
        nshadow = os.path.join(self.root, "nshadow")
        while not self.stopping.is_set():
            t0 = time.monotonic()
            os.stat(shadow)
            t1 = time.monotonic()
            with open(shadow, "rb") as f:
                text = f.read()
            t2 = time.monotonic()
            fd = os.open(nshadow, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, text)
            os.fsync(fd)
            os.close(fd)
            os.rename(nshadow, shadow)
            t3 = time.monotonic()
            self.times["stat"].append(t1 - t0)
            self.times["open"].append(t2 - t1)
            self.times["passwd"].append(t3 - t2)
            time.sleep(0.005)


def attack(name: str, where: str, seconds: float, copies: int, copy_mib: int) -> dict:
    probe = Probe(where)
    probe.start()
    time.sleep(0.5)  # root's baseline before the attack
    extra = [str(copies), str(copy_mib)] if name == "copies" else []
    if name == "log-flood":
        extra = ["y" * 3900]
    result = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                             "--clear-groups", "--", PYTHON, "-c", ATTACKS[name],
                             os.path.join(where, "pub"), str(seconds), *extra],
                            capture_output=True, text=True, timeout=seconds * 20 + 120)
    probe.stopping.set()
    probe.join(timeout=120)
    if result.returncode:
        raise RuntimeError("%s failed: %s" % (name, result.stderr[-2000:]))
    return {kind: {"worst_ms": round(max(t) * 1000, 1),
                   "median_ms": round(statistics.median(t) * 1000, 2), "count": len(t)}
            for kind, t in probe.times.items()}


def mount_rofs(lower: str, scratch: str, options: tuple[str, ...]):
    mnt, state = os.path.join(scratch, "mnt"), os.path.join(scratch, "state")
    os.makedirs(mnt, exist_ok=True)
    os.chmod(scratch, 0o755)
    proc = subprocess.Popen([sys.executable, "-m", "rofs", mnt, "--lower", lower,
                             "--state", state, "-f", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=os.path.dirname(HERE))
    wait_mounted(mnt, "fuse.rofs", proc)
    return mnt, proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each attack's length")
    parser.add_argument("--names", type=int, default=200_000,
                        help="names in the user's big directory")
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--copy-mib", type=int, default=64)
    parser.add_argument("--only", action="append", choices=sorted(ATTACKS),
                        help="run this attack only (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (mounts, and runs the attacks as uid %d)" % NOBODY)
    base = tempfile.mkdtemp(prefix="rofs-attacks-")
    os.chmod(base, 0o755)
    results = []
    try:
        for name in args.only or list(ATTACKS):
            for fs in ("ext4", "rofs"):
                scratch = os.path.join(base, "%s-%s" % (name, fs))
                os.mkdir(scratch)
                tree = os.path.join(scratch, "tree")
                build(tree, args.names if name in ("enotempty", "listing") else 0,
                      args.copies if name == "copies" else 0, args.copy_mib)
                proc = None
                where = tree
                if fs == "rofs":
                    where, proc = mount_rofs(tree, scratch, ("--no-open",) if name ==
                                             "listing" else ())
                try:
                    found = attack(name, where, args.seconds, args.copies, args.copy_mib)
                finally:
                    if proc is not None:
                        subprocess.run(["umount", where], check=False)
                        proc.wait(timeout=60)
                    shutil.rmtree(scratch, ignore_errors=True)
                results.append({"attack": name, "fs": fs, **found})
                print("%-10s %-5s  stat %7.1f ms (median %5.2f)  open %7.1f ms (median %5.2f)"
                      "  passwd %7.1f ms (median %6.2f, %d cycles)" % (
                          name, fs, found["stat"]["worst_ms"], found["stat"]["median_ms"],
                          found["open"]["worst_ms"], found["open"]["median_ms"],
                          found["passwd"]["worst_ms"], found["passwd"]["median_ms"],
                          found["passwd"]["count"]), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": args.seconds, "names": args.names, "copies": args.copies,
                       "copy_mib": args.copy_mib, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
