"""A small fsstress: random filesystem operations on a shared tree for a bounded time.

Usage: fsstress.py ROOT SEED SECONDS.  Errors a racing workload expects (ENOENT,
EEXIST, ...) are counted as normal; any other errno is printed and makes the exit
status 1.  Descriptors are closed even when an operation fails, so the daemon's memory
measures the daemon, not descriptors the workload forgot.
"""

import errno
import os
import random
import sys
import time

EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
            errno.EINVAL, errno.EPERM, errno.ENODATA,
            errno.ELOOP}
SYMLINK_TARGETS = ["f1", "sub", "a"]
assert not any(t.startswith("/") or ".." in t for t in SYMLINK_TARGETS)
DIRS = ["", "a", "b", "a/c", "b/d", "lowerdir", "lowerdir/sub"]
NAMES = ["f%d" % i for i in range(12)] + ["a", "b", "c", "d", "sub"]


def path(root, rng):
    return os.path.join(root, rng.choice(DIRS), rng.choice(NAMES))


def describe(root, rng):
    p, q = path(root, rng), path(root, rng)
    return rng.randrange(16), os.path.relpath(p, root), os.path.relpath(q, root)


def step(root, rng):
    p, q = path(root, rng), path(root, rng)
    op = rng.randrange(16)
    if op == 0:
        data, offset = os.urandom(rng.randrange(1, 20000)), rng.randrange(0, 50000)
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    elif op == 1:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        try:
            os.write(fd, b"appended\n")
        finally:
            os.close(fd)
    elif op == 2:
        os.truncate(p, rng.randrange(0, 30000))
    elif op == 3:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            while os.read(fd, 65536):
                pass
        finally:
            os.close(fd)
    elif op == 4:
        os.rename(p, q)
    elif op == 5:
        os.link(p, q)
    elif op == 6:
        os.unlink(p)
    elif op == 7:
        os.mkdir(p)
    elif op == 8:
        os.rmdir(p)
    elif op == 9:
        # Targets stay inside the tree: the workload follows these links, and a link to
        # "/" or ".." would let it create, chmod or remove files outside the mount.
        os.symlink(rng.choice(SYMLINK_TARGETS), p)
    elif op == 10:
        os.chmod(p, rng.choice([0o600, 0o644, 0o755]))
    elif op == 11:
        os.setxattr(p, "user.stress", os.urandom(8), follow_symlinks=False)
    elif op == 12:
        os.listdir(os.path.dirname(p))
    elif op == 13:
        os.lstat(p)
    elif op == 14:
        fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.unlink(p)
            os.fstat(fd)
        finally:
            os.close(fd)
    else:
        os.utime(p, follow_symlinks=False)


def main():
    root, seed, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else None
    trace = os.environ.get("FSSTRESS_TRACE")
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    done = failures = 0
    while time.monotonic() < deadline and (max_steps is None or done < max_steps):
        if trace:
            state = rng.getstate()
            probe = random.Random()
            probe.setstate(state)
            print("step", done, describe(root, probe), file=sys.stderr)
        try:
            step(root, rng)
        except OSError as e:
            if e.errno not in EXPECTED:
                failures += 1
                print("unexpected:", e, file=sys.stderr)
                if failures > 20:
                    break
        done += 1
    print(done)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
