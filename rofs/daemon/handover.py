"""Upgrade in place: a keeper running the code installed now takes over a mount.

`rofs restart MOUNTPOINT` (or SIGUSR1 to the keeper or its server) asks the server to
hand over: it stops reading requests, finishes the write log and the base store, and
exits.  The keeper then starts a new keeper, the `rofs` command as installed now,
with every descriptor it holds (the connection, the layers, the journal, the files
the kernel holds handles of) and what it needs to know in $ROFS_RESUME (JSON: the
mount's configuration, its policy as it was at the mount, the descriptors' numbers).
The new keeper starts its server, which takes over as after a crash (the requests read
and not answered are sent again), and says so on a pipe; then the old keeper exits.
If the new one fails before that, the old keeper goes on serving with its own code.
Under systemd the new keeper's server names the new main process (MAINPID=).
"""

from __future__ import annotations

import json
import logging
import os

from rofs.store import state
from rofs.store.journal import Journal
from rofs.store.layers import Markers
from rofs.store.policy import from_data, to_data

log = logging.getLogger(__name__)

VARIABLE = "ROFS_RESUME"
VERSION = 1
PREPARED = ("lower_fd", "upper_fd", "work_fd", "index_fd", "lock_fd", "upper_path",
            "work_path", "image_changed", "scratch_upper_fd", "scratch_work_fd",
            "scratch_index_fd", "scratch_path", "bases_fd")


def start_successor(command: list[str], config, prepared: state.Prepared, fd: int,
                    journal: Journal, serial: int, keep: frozenset[int],
                    at_mount: dict, started: float) -> bool:
    """Start the new keeper (`command`: the rofs command as installed now, with the
    mount's arguments) and wait until its server serves.  True: it does, and this
    keeper can go; False: it failed (logged), and this keeper still holds everything."""
    from rofs.daemon.keeper import sweep  # (the keeper imports nothing of this module)
    sweep(journal, keep)  # what the server that handed over left: only handles' files
    for name in os.listdir("/proc/self/fd"):
        try:
            os.set_inheritable(int(name), True)
        except OSError:
            pass  # the listing's own
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    data = {"version": VERSION, "fuse_fd": fd, "log_fd": journal.log_fd,
            "slots_fd": journal.slots_fd, "keep": sorted(keep), "serial": serial,
            "ready_fd": write_end, "at_mount": at_mount, "started": started,
            "config": config_data(config),
            "prepared": {name: getattr(prepared, name) for name in PREPARED} |
            {"markers": prepared.markers.prefix.decode(),
             "redirects": prepared.markers.redirects}}
    env = dict(os.environ, PYTHONMALLOC="malloc", **{VARIABLE: json.dumps(data)})
    pid = os.fork()
    if pid == 0:
        try:
            os.execve(command[0], command, env)
        finally:
            os._exit(127)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        told = pipe.read()
    if told == b"ok":
        return True
    _, status = os.waitpid(pid, 0)
    log.error("the new rofs (%s) did not take over %s (status %d): this one serves on",
              command[0], config.mountpoint, os.waitstatus_to_exitcode(status))
    return False


def config_data(config) -> dict:
    data = {name: getattr(config, name) for name in (
        "mountpoint", "lower", "state", "foreground", "debug", "fuse_options",
        "write_log", "scratch", "overlay", "userxattr", "redirects", "no_open",
        "on_image_change", "command")}
    data["policy"] = to_data(config.policy)
    return data


def resumed() -> dict | None:
    """$ROFS_RESUME, taken out of the environment (a server's children must not see
    it); None when not set.  ValueError: not of a version this code reads."""
    text = os.environ.pop(VARIABLE, None)
    if text is None:
        return None
    data = json.loads(text)
    if data.get("version") != VERSION:
        raise ValueError("handover data of version %r (this rofs reads %d)"
                         % (data.get("version"), VERSION))
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
