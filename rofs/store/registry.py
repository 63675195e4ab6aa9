"""The mounts a state dir has served and where their live daemons are.

A state dir serves one or more mounts; each mount records its mountpoint and lower
directory (and, kernel-style, its upper and work directories, and the lower tree's
fingerprint) in STATE/.rofs/mounts/ when it starts.  While a mount is live, its daemon
publishes its pid, the descriptor of the lower directory and its control socket in
/run/rofs/ ($XDG_RUNTIME_DIR/rofs/ for a user's), so the tools read the real lower
layer even when rofs is mounted over it (through /proc/PID/fd) and ask the daemon to do
what must go through it.  `Mount` is one mount as the tools see it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import urllib.parse
from dataclasses import dataclass

from rofs._sys import mount_entries, mount_table
from rofs.store.layers import (
    Markers,
)
from rofs.store.quoting import quote
from rofs.store.state import (
    PRIVATE_DIR,
    StateError,
    bases_dir,
    check_owner,
    layer_paths,
    mount_name,
    read_markers,
)

RUN_DIR = "/run/rofs"  # root's; another user's is $XDG_RUNTIME_DIR/rofs


MOUNTS_DIR = "mounts"


class ToolError(Exception):
    """One line for the user (exit code 2)."""


def _record_name(name: str) -> str:
    quoted = urllib.parse.quote(name, safe="")
    if len(quoted) > 200:
        quoted = quoted[:100] + "." + hashlib.sha256(name.encode()).hexdigest()[:32]
    return quoted + ".json"


def _record_path(state: str, mountpoint: str) -> str:
    return os.path.join(state, PRIVATE_DIR, MOUNTS_DIR, _record_name(mount_name(mountpoint)))


def mount_record(state: str, mountpoint: str) -> dict | None:
    """What the last mount of `mountpoint` recorded (None: none, or unreadable)."""
    try:
        with open(_record_path(state, mountpoint)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_mount(state: str, mountpoint: str, lower: str,
                 overlay: tuple[str, str] | None = None,
                 fingerprint: str | None = None) -> None:
    """Remember which lower directory (and, kernel-style, which upper and work
    directories) this mount of the state dir uses, and the lower tree's fingerprint
    (rofs.origin)."""
    path = _record_path(state, mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        record = {"mountpoint": mountpoint, "lower": lower}
        if overlay is not None:
            record["upperdir"], record["workdir"] = overlay
        if fingerprint is not None:
            record["lower_fingerprint"] = fingerprint
        json.dump(record, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_dir() -> str | None:
    """Where live daemons of this user say where they are (None: nowhere).
    $ROFS_RUN_DIR, when set, overrides the default for daemons and tools alike."""
    override = os.environ.get("ROFS_RUN_DIR")
    if override and os.path.isabs(override):
        return override
    if os.geteuid() == 0:
        return RUN_DIR
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base):
        return os.path.join(base, "rofs")
    return None


def runtime_path(mountpoint: str, suffix: str) -> str | None:
    base = run_dir()
    if base is None:
        return None
    digest = hashlib.sha256(os.path.normpath(mountpoint).encode()).hexdigest()[:24]
    return os.path.join(base, digest + suffix)


def publish_live(mountpoint: str, state: str, lower_fd: int, keeper: int) -> str | None:
    """Tell the tools where the live daemon is (this process, the server, and its
    keeper); returns the file written (or None)."""
    path = runtime_path(mountpoint, ".json")
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        sweep_stale(os.path.dirname(path))
        with open(path + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "keeper": keeper, "lower_fd": lower_fd,
                       "state": state,
                       "mountpoint": mountpoint,
                       "socket": runtime_path(mountpoint, ".sock")}, f)
        os.replace(path + ".tmp", path)
    except OSError:
        return None
    return path


def sweep_stale(directory: str) -> None:
    """Remove the records and sockets of daemons that are gone (killed: a clean exit
    removes its own), so the run dir does not fill up with them."""
    for name in os.listdir(directory):
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                info = json.load(f)
            pid, fd = int(info["pid"]), int(info["lower_fd"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.exists("/proc/%d/fd/%d" % (pid, fd)):
            continue
        for stale in (path, path[:-len(".json")] + ".sock"):
            try:
                os.unlink(stale)
            except OSError:
                pass


@dataclass
class Live:
    pid: int
    lower_fd: int
    socket: str


def live_daemon(mountpoint: str, state: str) -> Live | None:
    """The daemon serving `mountpoint` from `state`, if one is running."""
    path = runtime_path(mountpoint, ".json")
    if path is None:
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if os.path.realpath(info.get("state", "")) != os.path.realpath(state):
        return None
    pid, fd = info.get("pid"), info.get("lower_fd")
    if not isinstance(pid, int) or not isinstance(fd, int):
        return None
    if not os.path.exists("/proc/%d/fd/%d" % (pid, fd)):
        return None  # gone (its record is stale)
    return Live(pid, fd, info.get("socket", ""))


@dataclass
class Mount:
    """One mount of a state dir."""

    state: str
    mountpoint: str
    lower: str  # the lower directory as recorded
    live: Live | None = None
    overlay: tuple[str, str] | None = None  # kernel-style upperdir, workdir

    @property
    def upper(self) -> str:
        return layer_paths(self.state, self.mountpoint, self.overlay)[0]

    @property
    def work(self) -> str:
        return layer_paths(self.state, self.mountpoint, self.overlay)[1]

    @property
    def index(self) -> str:
        return layer_paths(self.state, self.mountpoint, self.overlay)[2]

    @property
    def markers(self) -> Markers:
        return read_markers(self.state)

    @property
    def bases(self) -> str:
        return bases_dir(self.state, self.mountpoint)

    def lower_root(self) -> str:
        """A path that opens the real lower directory, also under a live mount."""
        if self.live is not None:
            return "/proc/%d/fd/%d" % (self.live.pid, self.live.lower_fd)
        if os.path.realpath(self.lower) == os.path.realpath(self.mountpoint) and \
                is_rofs_mount(self.mountpoint):
            why = "" if run_dir() is not None else " ($XDG_RUNTIME_DIR is not set)"
            raise ToolError("%s is mounted by rofs but its daemon cannot be reached%s; "
                            "unmount it first" % (self.mountpoint, why))
        if not os.path.isdir(self.lower):
            raise ToolError("the lower directory %s of the mount %s is not there (a copied "
                            "state dir? give the lower with --lower DIR)"
                            % (self.lower, self.mountpoint))
        return self.lower


def rofs_mounts() -> list[str]:
    return [target for target, fstype in mount_table() if fstype == "fuse.rofs"]


def mount_owners() -> dict[str, int]:
    """The uid that made each rofs mount (FUSE's `user_id=`)."""
    owners = {}
    for target, fstype, options in mount_entries():
        if fstype == "fuse.rofs":
            for option in options.split(","):
                if option.startswith("user_id=") and option[8:].isdigit():
                    owners[target] = int(option[8:])
    return owners


def is_rofs_mount(path: str) -> bool:
    return os.path.realpath(path) in rofs_mounts()


def rofs_mount_containing(path: str) -> str | None:
    """The innermost live rofs mountpoint at or above `path` (not resolving symlinks
    in `path`, which is a path of the merged view)."""
    path = os.path.normpath(os.path.abspath(path))
    best = None
    for mnt in rofs_mounts():
        if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) > len(best):
                best = mnt
    return best


def dead_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone ("Transport endpoint is not connected").  statfs
    always asks the daemon; stat may be answered from the kernel's attribute cache."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def unmount_command(mountpoint: str) -> str:
    """How the user running this unmounts a (dead) mount: root needs no fusermount3
    (which takes a lock file inside /etc, on the very mount it unmounts)."""
    if os.geteuid() == 0:
        return "umount -l %s" % quote(mountpoint)
    return "fusermount3 -u -z %s" % quote(mountpoint)


def mounts(state: str) -> list[Mount]:
    """The mounts a state dir has served (from their records)."""
    state = os.path.realpath(state)
    if not os.path.isdir(state):
        raise ToolError("%s: no such directory" % quote(state))
    if not os.path.isdir(os.path.join(state, PRIVATE_DIR)):
        raise ToolError("%s is not a rofs state dir (no %s/)" % (quote(state), PRIVATE_DIR))
    # As the mount does: whoever can write the state dir wrote its records (which lower
    # and upper directories), and acting on them would read or delete what they chose.
    try:
        check_owner(state, doing="running this")
    except StateError as e:
        raise ToolError("%s (run it as the state dir's owner)" % e) from None
    d = os.path.join(state, PRIVATE_DIR, MOUNTS_DIR)
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                info = json.load(f)
            mnt, lower = info["mountpoint"], info["lower"]
            overlay = (info["upperdir"], info["workdir"]) if "upperdir" in info else None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.isdir(layer_paths(state, mnt, overlay)[0]):
            out.append(Mount(state, mnt, lower, live_daemon(mnt, state), overlay))
    if not out:
        raise ToolError("%s has no recorded mount (mount it once with this version of "
                        "rofs)" % state)
    return out


def mount_for(state: str, path: str | None) -> tuple[Mount, tuple[bytes, ...]]:
    """The mount of `state` holding the merged-view `path`, and the path below it."""
    choices = mounts(state)
    if path is None:
        if len(choices) > 1:
            raise ToolError("%s serves several mounts (%s): name a path"
                            % (state, ", ".join(m.mountpoint for m in choices)))
        return choices[0], ()
    path = os.path.normpath(os.path.abspath(path))
    best = None
    for m in choices:
        mnt = m.mountpoint.rstrip("/")
        if path == mnt or path.startswith(mnt + "/"):
            if best is None or len(mnt) > len(best.mountpoint):
                best = m
    if best is None:
        raise ToolError("%s is not below any mount of %s (%s)"
                        % (path, state, ", ".join(m.mountpoint for m in choices)))
    rel = path[len(best.mountpoint.rstrip("/")) + 1:]
    return best, tuple(os.fsencode(c) for c in rel.split("/") if c)


def use_lower(selected: list[Mount], lower: str, hint: str) -> None:
    """--lower DIR: the one selected mount's lower layer is DIR (not the recorded one)."""
    if len(selected) != 1:
        raise ToolError("the state dir serves %d mounts: %s --lower is for"
                        % (len(selected), hint))
    if not os.path.isdir(lower):
        raise ToolError("lower directory %s does not exist" % lower)
    selected[0].lower, selected[0].live = os.path.realpath(lower), None


def locked_upper(mount: Mount) -> int:
    """The upper dir, locked like a mount locks it (refused while mounted)."""
    fd = os.open(mount.upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ToolError("%s is in use by a rofs mount" % mount.upper) from None
    return fd
