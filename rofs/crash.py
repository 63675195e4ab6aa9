"""Crashes and failures on purpose, for tests.  Both are off unless their variable is set.

Crash points: `ROFS_CRASH_AT=site[:n]` makes the daemon kill itself (SIGKILL, nothing
flushed, nothing cleaned up: its keeper first, then the server) the n-th time (default:
the first) it reaches `site`, so a test can crash it exactly between two steps of a
change and check what the next mount shows (tests/test_crash_points.py).  With
`ROFS_CRASH_ONLY=server` only the server dies, and the keeper's next server takes over
the mount (rofs/daemon/keeper.py; tests/test_takeover.py); it crashes nowhere.
Unset, a crash point is one comparison.  An unknown site name is an error at mount
(`check`), so a typo cannot make a test pass by never crashing.

Pauses: `ROFS_PAUSE_AT=site` with `ROFS_PAUSE_FILE=FILE` makes whatever thread reaches
`site` create FILE and wait there until FILE is removed, so a test knows a slow step is
in flight (a big copy-up's data copy) while it checks that other requests are answered,
instead of timing them.

Injected failures: `ROFS_FAIL_AT=FILE` (`install_failures`).  On SIGUSR2 the daemon
reads `CALL N ERRNO` from FILE (CALL an os function such as fsync or setxattr, or
renameat2) and logs "armed"; from then on the N-th call of CALL made by the request
loop or its worker threads fails once with ERRNO (logged "injected").  So a test can
fail each system call of a change in turn, through a real mount
(tests/test_failure_paths.py).  Unset, nothing is wrapped.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time

from rofs import _sys

log = logging.getLogger(__name__)

# Every site, and where it is (docs/reliability.md lists what each test checks).
SITES = {
    "copy-up:prepared": "a copy-up's copy is whole in the work dir (and indexed)",
    "copy-up:placed": "a copy-up's copy is in place; other names of a hard link not yet",
    "copy-up:linked": "a copied-up hard link's other known name linked, count not yet",
    "create:prepared": "a new entry is whole in the work dir",
    "mkdir:swapped": "a directory replaced a whiteout; the whiteout in the work dir",
    "whiteout:prepared": "a whiteout is made in the work dir, not yet in place",
    "rename:marked": "a directory about to move got its redirect or opaque marker",
    "rename:across-placed": "a move across classes: the destination holds the copy, the "
                            "source name is still there",
    "materialize:linked": "a lower name of a copied-up hard link linked to the copy, the "
                          "index's count not yet lowered",
    "reconcile:linked": "reconcile linked a copy's version into the attic, its new version "
                        "not yet in place",
    "reconcile:replaced": "reconcile replaced (or moved out) one copy, the next not yet",
    "rename:done": "a rename made on disk; the node table (and its journal) not yet "
                   "told",
    "write:done": "a write made, not yet answered (an append sent again must not be "
                  "made twice)",
}
# Sites where ROFS_PAUSE_AT can hold a thread.
PAUSES = {
    "copy-up:data": "a copy-up's data copy, in a worker thread for a file over 1 MiB",
    "writelog:write": "the write log's writer, about to write a batch of events",
    "listing:read": "a big directory's listing, about to be read on a worker thread",
    "disk:wait": "a close, truncate or read that may wait on the disk, about to be made "
                 "on a closer or worker thread",
}

_at: tuple[str, int] | None = None
_seen = 0
# `ROFS_POISON_NAME=NAME`: every server that is asked to look NAME up kills itself (a
# request that kills every server: the keeper's guard, rofs/daemon/keeper.py).
POISON = os.fsencode(os.environ["ROFS_POISON_NAME"]) if os.environ.get(
    "ROFS_POISON_NAME") else None
_keeper = 0  # in a server: its keeper's pid
_pause: tuple[str, str] | None = None  # (site, file)


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    site, colon, count = value.rpartition(":")
    if colon and count.isdigit():  # site names have colons too: "copy-up:placed:2"
        return site, int(count)
    return value, 1


def check() -> None:
    """Read $ROFS_CRASH_AT; ValueError for an unknown site or a count of 0."""
    global _at, _pause
    _at = _parse(os.environ.get("ROFS_CRASH_AT"))
    if _at is not None and (_at[0] not in SITES or _at[1] < 1):
        raise ValueError("ROFS_CRASH_AT=%s: no such crash point (sites: %s)" % (
            os.environ["ROFS_CRASH_AT"], ", ".join(SITES)))
    site = os.environ.get("ROFS_PAUSE_AT")
    if site:
        if site not in PAUSES or not os.environ.get("ROFS_PAUSE_FILE"):
            raise ValueError("ROFS_PAUSE_AT=%s: no such pause point (%s), or no "
                             "ROFS_PAUSE_FILE" % (site, ", ".join(PAUSES)))
        _pause = site, os.environ["ROFS_PAUSE_FILE"]


def in_server(keeper: int, successor: bool) -> None:
    """This process serves the mount for `keeper`; a successor (a server taking over
    from one that died) has no crash point."""
    global _keeper, _at
    _keeper = keeper
    if successor:
        _at = None


def pause(site: str) -> None:
    """Wait here while $ROFS_PAUSE_FILE exists, if $ROFS_PAUSE_AT names this site."""
    if _pause is None or _pause[0] != site:
        return
    with open(_pause[1], "w"):
        pass
    while os.path.exists(_pause[1]):
        time.sleep(0.01)


def poisoned() -> None:
    """Die as a poison request makes a server die (ROFS_POISON_NAME)."""
    os.kill(os.getpid(), signal.SIGKILL)


def point(site: str) -> None:
    """Die here if $ROFS_CRASH_AT names this site (and this is its n-th time)."""
    global _seen
    if _at is None or _at[0] != site:
        return
    _seen += 1
    if _seen == _at[1]:
        if _keeper and os.environ.get("ROFS_CRASH_ONLY") != "server":
            os.kill(_keeper, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


# What ROFS_FAIL_AT can fail: the calls that change or read the layers.
FAILABLE = ("open", "stat", "fstat", "mkdir", "mknod", "symlink", "readlink", "link",
            "unlink", "rmdir", "chmod", "chown", "utime", "setxattr", "getxattr",
            "listxattr", "removexattr", "fsync", "fdatasync", "copy_file_range", "sendfile",
            "ftruncate", "truncate", "pwrite", "lseek", "scandir", "dup", "renameat2")


class _Failure:
    def __init__(self) -> None:
        self.call: str | None = None
        self.left = 0
        self.code = 0


def install_failures() -> None:
    """Wrap the FAILABLE calls and arm on SIGUSR2, if $ROFS_FAIL_AT names a file."""
    path = os.environ.get("ROFS_FAIL_AT")
    if not path:
        return
    failure = _Failure()

    def arm(signum, frame) -> None:
        with open(path) as f:
            call, n, code = f.read().split()
        if call not in FAILABLE:
            log.error("ROFS_FAIL_AT: %s cannot be failed", call)
            return
        failure.call, failure.left, failure.code = call, int(n), getattr(errno, code)
        log.warning("armed: call %s of %s fails with %s", n, call, code)

    def wrap(call: str, original):
        def failing(*args, **kwargs):
            if failure.call == call and threading.current_thread().name.startswith(
                    ("MainThread", "rofs-io")):
                failure.left -= 1
                if failure.left == 0:
                    failure.call = None
                    log.warning("injected: %s%r fails with %s", call, args,
                                errno.errorcode[failure.code])
                    raise OSError(failure.code, os.strerror(failure.code) + " (injected)")
            return original(*args, **kwargs)
        return failing

    for call in FAILABLE:
        original = getattr(_sys if call == "renameat2" else os, call)
        failing = wrap(call, original)
        # Wherever the function is reachable: os.open for every module, and names
        # imported on their own (from rofs._sys import renameat2).
        for module in list(sys.modules.values()):
            if module is None or not getattr(module, "__name__", "").startswith(
                    ("rofs", "os")):
                continue
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, failing)
    signal.signal(signal.SIGUSR2, arm)
