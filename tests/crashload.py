"""A write workload for the crash test: it runs until its mount dies under it.

    crashload.py MNT JOURNAL SEED

Every operation is journaled (unbuffered, to a file outside the mount) before it starts
and after it returned: the paths it touches with their state before and after (sha256
of a file's content, "dir" for a directory, null for nothing), and for a two-call
operation the valid state in between.  After the daemon is killed,
tests/test_crash.py holds the mount to that journal: operations done must show their
result, the one in flight its start, its result, or the state in between, whole.

Operations: the passwd cycle (temporary file, write, fsync, rename over a lower file),
copy-up of a big lower file (append), rename of a lower file over another, rename of a
lower directory back and forth, removal of a lower file (a whiteout) and its recreation.
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


def run(mnt: str, journal: Journal, rng: random.Random) -> None:
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
        journal.write({**entry, "phase": "begin"})
        action(full)
        journal.write({"id": entry["id"], "phase": "done"})

    while True:
        choice = rng.randrange(6)
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
                fd = os.open(full[0], os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"+")
                os.close(fd)

            op("copyup", [name], lambda old, data=data: [digest(data + b"+")], append)
        elif choice == 2:  # rename of one small file over another
            src, dst = rng.sample(SMALL, 2)
            op("rename", [src, dst], lambda old: [None, old[0]],
               lambda full: os.rename(full[0], full[1]))
            # put a file back under the source name for later cycles
            data = b"recreated %d\n" % rng.randrange(1 << 30)

            def recreate(full, data=data):
                with open(full[0], "wb") as f:
                    f.write(data)

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
                    with open(full[0], "wb") as f:
                        f.write(data)

                op("create", [name], lambda old, data=data: [digest(data)], back)
            else:
                op("unlink", [name], lambda old: [None], lambda full: os.unlink(full[0]))
        else:  # chmod of a lower file (metadata copy-up)
            name = rng.choice(VICTIMS + SMALL)
            if state(os.path.join(mnt, name)) is not None:
                op("chmod", [name], lambda old: old,
                   lambda full: os.chmod(full[0], rng.choice([0o600, 0o644, 0o640])))


def main() -> int:
    mnt, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        run(mnt, Journal(journal), random.Random(seed))
    except OSError:
        return 0  # the mount died under us: that is the point
    return 1


if __name__ == "__main__":
    sys.exit(main())
