"""The keeper: holds a mount's connection while servers come and go.

The kernel keeps a FUSE connection, and every request on it, for as long as any
process holds its /dev/fuse descriptor.  The keeper is the process that mounted: it
holds that descriptor, the layers' descriptors and the journal (rofs/store/journal.py)
and does nothing else.  It starts the server as a fork that shares its descriptor table
(`_sys.fork_sharing_files`), so every descriptor the server opens (open files, kept
objects) is the keeper's too and outlives the server.  When the server dies (killed,
crashed, an uncaught error) the keeper starts another from the same point: it closes
what the dead one left that no handle stands for, asks the kernel to send again the
requests the dead one had read and not answered, and answers every node id and handle
the kernel holds from the journal.  Callers see a pause.

A server that ends on purpose (a signal to it or to the keeper, an unmount) unmounts
and exits 0, and the keeper with it.  Death spirals: when POISON_DEATHS servers in a row
died with the same request in hand (one that kills every server), the next answers it
EIO, and the rest of the mount keeps working; when IDLE_DEATHS servers in a row crashed
on their own (not SIGKILLed) before starting a single request, the keeper gives up (and
unmounts), as a daemon without a keeper would have died.  Servers dying in a row on the
same request (or on none) start ever more slowly.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from collections.abc import Callable

from rofs import _sys
from rofs.fuse.proto import UNIQUE_RESEND
from rofs.store.journal import Journal

log = logging.getLogger(__name__)

POISON_DEATHS = 5
IDLE_DEATHS = 5
HANDOVER = 75  # a server's exit status: it handed over (rofs/daemon/handover.py)
# What a restart did (Keeper.run's `restart`): the mount is another keeper's now; the
# new keeper failed and the server still serves; it failed after the server handed over.
DONE, SERVING, STOPPED = "done", "serving", "stopped"


class _RestartAsked(Exception):
    """SIGUSR1 while the keeper waits for its server."""


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return "killed by %s" % signal.Signals(number).name
        except ValueError:
            return "killed by signal %d" % number
    return "exited with status %d" % os.waitstatus_to_exitcode(status)


class Keeper:
    """Runs servers of one mount, one at a time, until one ends on purpose."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.server = 0  # the running server's pid
        # The request each server that died in a row had in hand (0: none).
        self._in_hand: collections.deque[int] = collections.deque(maxlen=POISON_DEATHS)
        self.refuse: frozenset[int] = frozenset()  # requests the next server answers EIO
        self.servers = 0  # started so far
        self._waiting = False
        self._restart_asked = False
        self._crashed_idle = 0  # servers in a row that crashed before any request
        self.keep: frozenset[int] = frozenset()  # the keeper's own descriptors

    def run(self, serve: Callable[[int, dict[int, tuple[int, int]] | None], int],
            serial: int = 0, keep: frozenset[int] | None = None,
            restart: Callable[[int, int], str] | None = None) -> int:
        """`serve(serial, survivors)` runs in each server: serial 0 for a new mount's
        first (survivors None), then survivors as `sweep` found them; `refuse` is what
        it must answer EIO.  `keep`: the keeper's own descriptors (default: all open
        now).  `restart(server pid, serial)`, on SIGUSR1: DONE, SERVING or STOPPED.
        Returns the exit code of the server that ended on purpose (0 too when the mount
        was handed to a new keeper), or 1 when giving up."""
        self.keep = keep = self._own_descriptors() if keep is None else keep
        started = 0.0
        forward = {sig: signal.signal(sig, self._forward)
                   for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                               signal.SIGUSR1)}
        try:
            while True:
                self.journal.set_in_hand(0)
                started = time.monotonic()
                self.servers += 1
                keeper = os.getpid()
                pid = _sys.fork_sharing_files()
                if pid == 0:
                    for sig, handler in forward.items():
                        signal.signal(sig, handler)
                    os._exit(self._server(serve, serial, keep, keeper))
                self.server = pid
                status = self._wait(pid, serial, restart)
                self.server = 0
                if status is None:
                    return 0  # another keeper's now
                if status == -1:  # a restart that failed after the server handed over
                    serial += 1
                    self.journal.set_replaced(serial, "restart failed: same code")
                    continue
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    return 0
                reason = describe_status(status)
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == HANDOVER:
                    reason = "handed over unasked"
                minor = self.journal.header()[0]
                if not minor:
                    # It never served (no INIT): a failed start, not a death.
                    log.error("the server (pid %d) %s before the mount was ready",
                              pid, reason)
                    return os.waitstatus_to_exitcode(status) or 1
                if time.monotonic() - started > 10:
                    self._in_hand.clear()  # not in a row
                in_hand = self.journal.in_hand() & ~UNIQUE_RESEND
                self._in_hand.append(in_hand)
                killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                self._crashed_idle = 0 if in_hand or killed else self._crashed_idle + 1
                if self._crashed_idle >= IDLE_DEATHS:
                    log.error("the server (pid %d) %s; %d servers in a row crashed before "
                              "serving anything: giving up (the mount goes)", pid, reason,
                              IDLE_DEATHS)
                    return 1
                recent = list(self._in_hand)[-POISON_DEATHS:]
                if in_hand and len(recent) == POISON_DEATHS and len(set(recent)) == 1:
                    log.error("%d servers in a row died serving request #%d: the next "
                              "answers it EIO", POISON_DEATHS, in_hand)
                    self.refuse = self.refuse | {in_hand}
                stuck = 0  # deaths in a row on the same request (or on none)
                for earlier in reversed(self._in_hand):
                    if earlier != in_hand:
                        break
                    stuck += 1
                if stuck > 1:  # not at full speed
                    time.sleep(0.1 * stuck)
                serial += 1
                self.journal.set_replaced(serial, reason)
                log.warning("the server (pid %d) %s: another takes over the mount (%d "
                            "so far)", pid, reason, serial)
        finally:
            for sig, handler in forward.items():
                signal.signal(sig, handler)

    def _wait(self, pid: int, serial: int, restart) -> int | None:
        """The server's wait status; None once a restart handed the mount over; -1
        when a restart failed after the server handed over."""
        while True:
            try:
                self._waiting = True
                if self._restart_asked:
                    raise _RestartAsked
                return _wait(pid)
            except _RestartAsked:
                self._waiting = self._restart_asked = False
                if restart is None:
                    continue
                outcome = restart(pid, serial)
                if outcome == DONE:
                    return None
                if outcome == STOPPED:
                    return -1
            finally:
                self._waiting = False

    def _forward(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:  # a restart (rofs restart): done by the keeper
            self._restart_asked = True
            if self._waiting:
                raise _RestartAsked
            return
        if self.server:
            try:
                os.kill(self.server, signum)
            except ProcessLookupError:
                pass

    def _server(self, serve, serial: int, keep: frozenset[int], keeper: int) -> int:
        code = 70
        try:
            _sys.die_with_parent(signal.SIGKILL)
            if os.getppid() != keeper:  # it died before that took hold
                return code
            survivors = None
            if serial:
                survivors = sweep(self.journal, keep)
            code = serve(serial, survivors)
        except BaseException:
            log.exception("the server failed")
        return code

    @staticmethod
    def _own_descriptors() -> frozenset[int]:
        return frozenset(int(fd) for fd in os.listdir("/proc/self/fd"))


def sweep(journal: Journal, keep: frozenset[int]) -> dict[int, tuple[int, int]]:
    """In a new server: close what a dead one left open that no handle or kept object
    stands for (its directory cache, sockets, idle readers); return the rest,
    descriptor -> (node id, handles)."""
    survivors = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        ino, handles = journal.kept(fd)
        if ino:
            # (Even a number the keeper had once, such as the pipe that told a parent
            # the mount was ready, closed since: a server may have been given it.)
            survivors[fd] = (ino, handles)
            continue
        if fd in keep:
            continue
        try:
            os.close(fd)
        except OSError:
            pass  # the listing's own descriptor
    return survivors


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return 0
