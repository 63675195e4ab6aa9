"""A workload that must not notice its mount's server being killed and replaced.

    takeover_load.py MNT STOPFILE RESULT

Runs until STOPFILE exists, then writes RESULT (JSON: operations done, the longest
single call in seconds, and the first error, if any: any error fails the test).  Every
operation checks its own result at once.  Operations: the passwd cycle (a temporary
file written and fsynced, a lock taken with link(), renamed over a lower file), sed -i
(a copy renamed over a lower file), appends that copy up a big lower file, a rename of a
file back and forth, mkdir/rmdir, a create/unlink in the working directory (a cwd
inside the mount, by relative paths), and reads and writes through descriptors held
open from the start (one of them of a file unlinked since).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback


def main(mnt: str, stop: str, result: str) -> int:
    done = 0
    longest = 0.0
    error = None
    held_read = os.open(os.path.join(mnt, "passwd"), os.O_RDONLY)
    lower_passwd = os.pread(held_read, 1 << 20, 0)
    gone = os.path.join(mnt, "held-gone")
    with open(gone, "wb") as f:
        f.write(b"kept\n")
    held_gone = os.open(gone, os.O_RDWR | os.O_APPEND)
    os.unlink(gone)
    gone_size = 5
    os.chdir(os.path.join(mnt, "d"))
    big = os.path.join(mnt, "big")
    big_size = os.stat(big).st_size
    turn = 0

    def timed(fn, *args):
        nonlocal longest
        start = time.monotonic()
        value = fn(*args)
        longest = max(longest, time.monotonic() - start)
        return value

    try:
        while not os.path.exists(stop):
            turn += 1
            # the passwd cycle
            text = b"root:$6$%d:19000:0:99999:7:::\n" % turn * 3
            tmp = os.path.join(mnt, "nshadow")
            fd = timed(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            timed(os.write, fd, text)
            timed(os.fsync, fd)
            timed(os.close, fd)
            lock = os.path.join(mnt, "shadow.lock")
            timed(os.link, tmp, lock)
            timed(os.rename, tmp, os.path.join(mnt, "shadow"))
            timed(os.unlink, lock)
            with open(os.path.join(mnt, "shadow"), "rb") as f:
                assert f.read() == text, "shadow"
            # sed -i
            name = os.path.join(mnt, "hosts")
            with open(name, "rb") as f:
                old = f.read()
            new = old.replace(b"%d" % (turn - 1), b"%d" % turn) if turn > 1 else \
                old + b"1\n"
            with open(os.path.join(mnt, "sedXYZ"), "wb") as f:
                f.write(new)
            timed(os.rename, os.path.join(mnt, "sedXYZ"), name)
            with open(name, "rb") as f:
                assert f.read() == new, "hosts"
            # copy-up by append
            with open(big, "ab") as f:
                f.write(b"%08d\n" % turn)
            big_size += 9
            assert timed(os.stat, big).st_size == big_size, "big"
            # rename back and forth
            a, b = os.path.join(mnt, "group"), os.path.join(mnt, "group-moved")
            timed(os.rename, a, b)
            timed(os.rename, b, a)
            # mkdir / rmdir
            made = os.path.join(mnt, "made")
            timed(os.mkdir, made)
            timed(os.rmdir, made)
            # relative to a cwd inside
            with open("rel", "wb") as f:
                f.write(b"%d\n" % turn)
            with open("rel", "rb") as f:
                assert f.read() == b"%d\n" % turn, "rel"
            timed(os.unlink, "rel")
            # held descriptors
            assert timed(os.pread, held_read, 1 << 20, 0) == lower_passwd, "held read"
            timed(os.write, held_gone, b"x")
            gone_size += 1
            assert os.fstat(held_gone).st_size == gone_size, "held unlinked"
            done += 1
    except BaseException as e:  # noqa: BLE001 - reported, not raised
        error = "%s: %s (turn %d) at %s" % (type(e).__name__, e, turn, " < ".join(
            "line %d" % frame.lineno for frame in traceback.extract_tb(e.__traceback__)))
    os.chdir("/")
    with open(result, "w") as f:
        json.dump({"done": done, "longest": longest, "error": error,
                   "big": hashlib.sha256(open(big, "rb").read()).hexdigest()}, f)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
