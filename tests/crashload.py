"""A write workload for the crash tests: it runs until its mount dies under it.

    crashload.py MNT JOURNAL SEED [MARKS COUNT]

Every operation is journaled (unbuffered, to a file outside the mount) before it starts
and after it returned: the paths it touches with their state before and after (sha256
of a file's content, "dir" for a directory, null for nothing), and for a two-call
operation the valid state in between.  After the daemon is killed,
tests/test_crash.py holds the mount to that journal: operations done must show their
result, the one in flight its start, its result, or the state in between, whole.

Operations: the passwd cycle (temporary file, write, fsync, rename over a lower file),
copy-up of a big lower file (append, fsync), rename of a lower file over another, rename
of a lower directory back and forth, removal of a lower file (a whiteout) and its
recreation, `sed -i` (a copy written without fsync, renamed over the file), a write to
a lower hard link (both names show it), and a hard link made and removed.  Writes are
fsynced, except sed -i's, so every operation is durable once it returns
(docs/reliability.md).

With MARKS (tests/test_power_cut.py): after each operation its id is written to MARKS,
a file of tests/blocklog.py, which puts it in the block device's log; COUNT operations,
then exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

SMALL = ["passwd", "shadow", "group", "gshadow", "hosts"]
BIG = ["big%d" % i for i in range(4)]
DIRS = ("dir-a", "dir-b")  # one of them exists at any time
VICTIMS = ["victim%d" % i for i in range(6)]
LINKED = ("linked-a", "linked-b")  # one lower file, two names


def build(lower):
    """The lower layer the workload expects."""
    os.makedirs(lower)
    for name in SMALL + VICTIMS:
        with open(os.path.join(lower, name), "w") as f:
            f.write("lower %s\n" % name * 20)
    for name in BIG:
        with open(os.path.join(lower, name), "wb") as f:
            f.write(os.urandom(4 << 20))
    os.makedirs(os.path.join(lower, DIRS[0], "sub"))
    with open(os.path.join(lower, DIRS[0], "inside"), "w") as f:
        f.write("inside\n")
    with open(os.path.join(lower, LINKED[0]), "w") as f:
        f.write("one file, two names\n")
    os.link(os.path.join(lower, LINKED[0]), os.path.join(lower, LINKED[1]))


def state(path: str):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            return "dir"
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except FileNotFoundError:
        return None


class Journal:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.n = 0

    def write(self, entry: dict) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: str, data: bytes, flags: int = os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def run(mnt: str, journal: Journal, rng: random.Random, marks: int | None = None,
        count: int | None = None) -> None:
    def op(kind, paths, new, action):
        """Journal, act, journal: `new` are the states expected afterwards.  A "create"
        is two system calls (open with O_CREAT|O_TRUNC, then write), so an empty file
        is a valid state in between; every other operation here is one call that must
        be whole or absent."""
        full = [os.path.join(mnt, p) for p in paths]
        old = [state(p) for p in full]
        journal.n += 1
        entry = {"id": "%d.%d" % (os.getpid(), journal.n), "op": kind, "paths": paths,
                 "old": old, "new": new(old)}
        if kind == "create":
            entry["between"] = [digest(b"")]
        elif kind == "hardlink-write":  # opened with O_TRUNC, then written
            entry["between"] = [digest(b"")] * 2
        journal.write({**entry, "phase": "begin"})
        action(full)
        journal.write({"id": entry["id"], "phase": "done"})
        if marks is not None:
            os.write(marks, entry["id"].encode())

    while count is None or journal.n < count:
        choice = rng.randrange(9)
        if choice == 0:  # the passwd cycle
            name = rng.choice(SMALL)
            data = ("%s %d\n" % (name, rng.randrange(1 << 30))).encode() * rng.randrange(
                1, 300)

            def passwd(full, data=data, name=name):
                tmp = os.path.join(mnt, "n" + name)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                os.rename(tmp, full[0])

            op("passwd", [name], lambda old, data=data: [digest(data)], passwd)
        elif choice == 1:  # copy-up of a big lower file
            name = rng.choice(BIG)
            path = os.path.join(mnt, name)
            with open(path, "rb") as f:
                data = f.read()

            def append(full):
                write_file(full[0], b"+", os.O_APPEND)

            op("copyup", [name], lambda old, data=data: [digest(data + b"+")], append)
        elif choice == 2:  # rename of one small file over another
            src, dst = rng.sample(SMALL, 2)
            op("rename", [src, dst], lambda old: [None, old[0]],
               lambda full: os.rename(full[0], full[1]))
            # put a file back under the source name for later cycles
            data = b"recreated %d\n" % rng.randrange(1 << 30)

            def recreate(full, data=data):
                write_file(full[0], data)

            op("create", [src], lambda old, data=data: [digest(data)], recreate)
        elif choice == 3:  # a lower directory moved back and forth
            here = DIRS[0] if os.path.isdir(os.path.join(mnt, DIRS[0])) else DIRS[1]
            there = DIRS[1] if here == DIRS[0] else DIRS[0]
            op("dirmove", [here, there, here + "/inside", there + "/inside"],
               lambda old: [None, "dir", None, old[2]],
               lambda full: os.rename(full[0], full[1]))
        elif choice == 4:  # a whiteout
            name = rng.choice(VICTIMS)
            if state(os.path.join(mnt, name)) is None:
                data = b"back %d\n" % rng.randrange(1 << 30)

                def back(full, data=data):
                    write_file(full[0], data)

                op("create", [name], lambda old, data=data: [digest(data)], back)
            else:
                op("unlink", [name], lambda old: [None], lambda full: os.unlink(full[0]))
        elif choice == 5:  # chmod of a lower file (metadata copy-up)
            name = rng.choice(VICTIMS + SMALL)
            if state(os.path.join(mnt, name)) is not None:
                op("chmod", [name], lambda old: old,
                   lambda full: os.chmod(full[0], rng.choice([0o600, 0o644, 0o640])))
        elif choice == 6:  # sed -i: a copy written (no fsync) and renamed over the file
            name = rng.choice(SMALL)
            data = ("edited %d\n" % rng.randrange(1 << 30)).encode() * rng.randrange(1, 200)

            def sed(full, data=data, name=name):
                tmp = os.path.join(mnt, "sed" + name)
                with open(tmp, "wb") as f:
                    f.write(data)
                os.rename(tmp, full[0])

            op("sed-i", [name], lambda old, data=data: [digest(data)], sed)
        elif choice == 7:  # a write to a lower hard link: both names show it
            name = rng.choice(LINKED)
            data = b"linked %d\n" % rng.randrange(1 << 30)
            op("hardlink-write", list(LINKED),
               lambda old, data=data: [digest(data)] * 2,
               lambda full, data=data, name=name: write_file(os.path.join(mnt, name), data))
        else:  # a hard link made, or removed
            name = rng.choice(VICTIMS + SMALL)
            link = name + ".link"
            if state(os.path.join(mnt, link)) is not None:
                op("unlink-link", [name, link], lambda old: [old[0], None],
                   lambda full: os.unlink(full[1]))
            elif state(os.path.join(mnt, name)) is not None:
                op("link", [name, link], lambda old: [old[0], old[0]],
                   lambda full: os.link(full[0], full[1]))


def main() -> int:
    mnt, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:  # a fixed number of operations, each marked
        marks = os.open(sys.argv[4], os.O_WRONLY)
        run(mnt, Journal(journal), random.Random(seed), marks, int(sys.argv[5]))
        return 0
    try:
        run(mnt, Journal(journal), random.Random(seed))
    except OSError:
        return 0  # the mount died under us: that is the point
    return 1


if __name__ == "__main__":
    sys.exit(main())
