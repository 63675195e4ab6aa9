"""Upgrade in place: a keeper running the code installed now takes over a mount.

`rofs restart MOUNTPOINT` (SIGUSR1 to the keeper) goes in two steps, because a new
process needs the mount to start (the dynamic loader reads /etc/ld.so.cache, and rofs
may be /etc):
1. While the server still serves, the keeper starts the `rofs` command as installed
   now, with one end of a socket pair ($ROFS_RESUME names it).  The new keeper loads all
   its code and says "ready".
2. The keeper has its server hand over (stop reading requests, write out the write log
   and the base store, exit), then sends the new keeper, over the socket, the mount's
   configuration and its policy as mounted (JSON) and every descriptor it holds (the
   connection, the layers, the journal, the files the kernel holds handles of), each
   to be put at the same number (a file handle carries its descriptor's number).  The
   new keeper's server takes over as after a crash (the kernel sends again what the
   old one had read and not answered) and the new keeper says "serving"; the old
   keeper exits.  If the new one fails before that, the old keeper starts a server of
   its own code again.
Under systemd the new keeper's server names the new main process (MAINPID=).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import socket
import struct

from rofs.store import state
from rofs.store.journal import Journal
from rofs.store.layers import Markers
from rofs.store.policy import from_data, to_data

log = logging.getLogger(__name__)

VARIABLE = "ROFS_RESUME"
VERSION = 2
PREPARED = ("lower_fd", "upper_fd", "work_fd", "index_fd", "lock_fd", "upper_path",
            "work_path", "image_changed", "scratch_upper_fd", "scratch_work_fd",
            "scratch_index_fd", "scratch_path", "bases_fd")
READY, SERVING = b"ready\n", b"serving\n"
STARTUP_TIMEOUT = 60.0  # for the new rofs to load its code
BATCH = 200  # descriptors per message
LENGTH = struct.Struct("<Q")


class Successor:
    """The old keeper's side: the new keeper, started and loaded (step 1)."""

    def __init__(self, command: list[str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, PYTHONMALLOC="malloc",
                   **{VARIABLE: json.dumps({"version": VERSION, "socket": theirs.fileno()})})
        theirs.set_inheritable(True)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.execve(command[0], command, env)
            finally:
                os._exit(127)
        theirs.close()
        self.sock = mine
        self.command = command

    def wait_for(self, word: bytes, timeout: float | None) -> bool:
        """Whether the new keeper said `word` (False: it died, or said nothing in time)."""
        got = b""
        while not got.endswith(b"\n"):
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                return False
            chunk = self.sock.recv(64)
            if not chunk:
                return False
            got += chunk
        return got == word

    def hand(self, config, prepared: state.Prepared, fd: int, journal: Journal,
             serial: int, at_mount: dict, started: float) -> None:
        """Step 2, once the server handed over: the mount's data, and every descriptor
        the new keeper needs (`data["fds"]` their numbers): the connection, the
        journal, the layers, and the files and objects the journal marks."""
        fds = [fd, journal.log_fd, journal.slots_fd] + [
            getattr(prepared, name) for name in PREPARED
            if name.endswith("_fd") and getattr(prepared, name) >= 0] + sorted(
            int(n) for n in os.listdir("/proc/self/fd") if journal.kept(int(n))[0])
        data = {"fuse_fd": fd, "log_fd": journal.log_fd, "slots_fd": journal.slots_fd,
                "serial": serial, "at_mount": at_mount, "started": started,
                "config": config_data(config), "fds": fds,
                "prepared": {name: getattr(prepared, name) for name in PREPARED} |
                {"markers": prepared.markers.prefix.decode(),
                 "redirects": prepared.markers.redirects}}
        text = json.dumps(data).encode()
        self.sock.sendall(LENGTH.pack(len(text)) + text)
        for start in range(0, len(fds), BATCH):
            socket.send_fds(self.sock, [b"f"], fds[start:start + BATCH])

    def fail(self) -> None:
        """It failed: make sure it is gone, and reap it."""
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(self.pid, 0)
        log.error("the new rofs (%s) did not take over (%s): this one serves on",
                  self.command[0], os.waitstatus_to_exitcode(status))
        self.sock.close()


def config_data(config) -> dict:
    data = {name: getattr(config, name) for name in (
        "mountpoint", "lower", "state", "foreground", "debug", "fuse_options",
        "write_log", "scratch", "overlay", "userxattr", "redirects", "no_open",
        "on_image_change", "command")}
    data["policy"] = to_data(config.policy)
    return data


# ------------------------------------------------------------ the new keeper's side

def resumed() -> socket.socket | None:
    """The socket to the old keeper when $ROFS_RESUME is set (taken out of the
    environment: a server's children must not see it), moved to a number no handed
    descriptor can have; None when not set.  ValueError: not of a version this code
    speaks."""
    text = os.environ.pop(VARIABLE, None)
    if text is None:
        return None
    data = json.loads(text)
    if data.get("version") != VERSION:
        raise ValueError("handover of version %r (this rofs speaks %d)"
                         % (data.get("version"), VERSION))
    return socket.socket(fileno=_out_of_the_way(data["socket"]))


def receive(sock: socket.socket) -> dict:
    """Say "ready", then wait for the old keeper's data and descriptors, and put each
    descriptor at its number."""
    sock.sendall(READY)
    head = _exactly(sock, LENGTH.size)
    data = json.loads(_exactly(sock, LENGTH.unpack(head)[0]))
    numbers: list[int] = data["fds"]
    got: list[int] = []
    while len(got) < len(numbers):
        _, fds, _, _ = socket.recv_fds(sock, 1, BATCH)
        if not fds:
            raise EOFError("the old keeper stopped sending descriptors")
        got += [_out_of_the_way(fd) for fd in fds]
    for number, fd in zip(numbers, got, strict=True):
        os.dup2(fd, number, inheritable=False)
        os.close(fd)
    return data


def _out_of_the_way(fd: int) -> int:
    """`fd` moved to the top of the descriptor table, where no handed number is."""
    limit = os.sysconf("SC_OPEN_MAX")
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(limit - 4096, limit // 2))
    os.close(fd)
    return moved


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the old keeper went away")
        data += chunk
    return data


def rebuild(data: dict, config_class):
    """(config, prepared, journal) from the handover data."""
    values = dict(data["config"])
    values["policy"] = from_data(values["policy"])
    if values["overlay"] is not None:
        values["overlay"] = tuple(values["overlay"])
    config = config_class(**values)
    fields = dict(data["prepared"])
    markers = Markers(fields.pop("markers").encode())
    markers.redirects = fields.pop("redirects")
    prepared = state.Prepared(markers=markers, **fields)
    return config, prepared, Journal(data["log_fd"], data["slots_fd"])
