"""State tools: what changed against the lower (`rofs diff`), dropping a change
(`rofs revert`), and finding and repairing what a crash or a hand edit left behind
(`rofs check`).  See docs/state-tools.md.

A state dir serves one or more mounts; each mount records its mountpoint and lower
directory in STATE/.rofs/mounts/ when it starts.  While a mount is live, its daemon
publishes its pid and the descriptor of the lower directory in /run/rofs/, so these
tools read the real lower layer even when rofs is mounted over it (through
/proc/PID/fd), and `revert` asks the daemon to do the work, so the kernel's caches
stay true.
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import hashlib
import json
import os
import stat
import urllib.parse
from dataclasses import dataclass, field

from rofs import index, origin
from rofs._sys import mount_entries, mount_table, open_noatime, proc_path
from rofs.layers import (
    SKIP,
    Markers,
    UpperLayer,
    is_whiteout,
    open_below,
    open_listable,
    remove_path,
    walk_sorted,
)
from rofs.names import count, quote, quote_path, top_dir, unquote
from rofs.state import (
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


# ---------------------------------------------------------------- mount records


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


def publish_live(mountpoint: str, state: str, lower_fd: int) -> str | None:
    """Tell the tools where the live daemon is; returns the file written (or None)."""
    path = runtime_path(mountpoint, ".json")
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        sweep_stale(os.path.dirname(path))
        with open(path + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "lower_fd": lower_fd, "state": state,
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
                _is_rofs_mount(self.mountpoint):
            why = "" if run_dir() is not None else " ($XDG_RUNTIME_DIR is not set)"
            raise ToolError("%s is mounted by rofs but its daemon cannot be reached%s; "
                            "unmount it first" % (self.mountpoint, why))
        if not os.path.isdir(self.lower):
            raise ToolError("the lower directory %s of the mount %s is not there (a copied "
                            "state dir? give the lower with --lower DIR)"
                            % (self.lower, self.mountpoint))
        return self.lower


def _rofs_mounts() -> list[str]:
    return [target for target, fstype in mount_table() if fstype == "fuse.rofs"]


def _mount_owners() -> dict[str, int]:
    """The uid that made each rofs mount (FUSE's `user_id=`)."""
    owners = {}
    for target, fstype, options in mount_entries():
        if fstype == "fuse.rofs":
            for option in options.split(","):
                if option.startswith("user_id=") and option[8:].isdigit():
                    owners[target] = int(option[8:])
    return owners


def _is_rofs_mount(path: str) -> bool:
    return os.path.realpath(path) in _rofs_mounts()


def rofs_mount_containing(path: str) -> str | None:
    """The innermost live rofs mountpoint at or above `path` (not resolving symlinks
    in `path`, which is a path of the merged view)."""
    path = os.path.normpath(os.path.abspath(path))
    best = None
    for mnt in _rofs_mounts():
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


def status(mountpoints: list[str]) -> list[dict]:
    """What each live rofs mount says of itself (all of them when none is named):
    {"mountpoint", "ok", ...}; "ok" False with an "error" for a dead or silent one."""
    from rofs import control
    names = [os.path.realpath(m) for m in mountpoints] or sorted(_rofs_mounts())
    owners = _mount_owners()
    out = []
    for mnt in names:
        entry: dict = {"mountpoint": mnt, "ok": False}
        out.append(entry)
        if not _is_rofs_mount(mnt):
            outer = rofs_mount_containing(mnt)
            if outer is not None:  # a path inside a mount: that mount's status
                entry.update(mountpoint=outer, asked=mnt)
                mnt = outer
        if dead_mount(mnt):
            entry["error"] = ("dead: the daemon is gone; run `%s` and mount again"
                              % unmount_command(mnt))
            continue
        if not _is_rofs_mount(mnt):
            entry["error"] = "not a rofs mount"
            continue
        owner = owners.get(mnt, os.geteuid())
        if owner != os.geteuid():
            # Another user's mount (a user's own, or root's seen by a user): its daemon
            # is alive, which is all this caller may rely on.  Root does not ask it
            # either: what a user's daemon answers would be that user's words in root's
            # terminal.
            entry.update(ok=True, owner=owner)
            continue
        socket_path = runtime_path(mnt, ".sock")
        if socket_path is None:
            entry["error"] = "no runtime dir to reach the daemon ($XDG_RUNTIME_DIR)"
            continue
        try:
            reply = control.request(socket_path, {"op": "status"}, timeout=10)
        except control.ControlError as e:
            entry["error"] = str(e)
            continue
        reply.pop("ok", None)
        entry.update(reply, ok=True)
    return out


def format_status(entries: list[dict], now: float) -> str:
    if not entries:
        return "no rofs mounts\n"
    lines = []
    for e in entries:
        if e.get("asked"):
            lines.append("%s is inside the rofs mount %s:" % (quote(e["asked"]),
                                                             quote(e["mountpoint"])))
        if not e["ok"]:
            lines.append("%s: %s" % (quote(e["mountpoint"]), e["error"]))
            continue
        if "owner" in e:
            lines.append("%s: live, mounted by uid %d (`rofs status` as that user says "
                         "more)" % (quote(e["mountpoint"]), e["owner"]))
            continue
        up = int(now - e["started"])
        lines.append("%s: live, pid %d, up %dd %02d:%02d:%02d" % (
            quote(e["mountpoint"]), e["pid"], up // 86400, up // 3600 % 24, up // 60 % 60,
            up % 60))
        lines.append("  state    %s (upper %s, %s markers)" % (
            quote(e["state"]), quote(e["upper"]), e["markers"]))
        lines.append("  lower    %s" % quote(e["lower"]))
        rules = ", ".join("%d %s" % (n, c) for c, n in sorted(e["rules"].items()))
        lines.append("  policy   default %s%s" % (e["default_class"],
                                                  "; rules: " + rules if rules else ""))
        if e["scratch"]:
            lines.append("  scratch  %s" % quote(e["scratch"]))
        attic = e.get("attic") or {}
        if attic.get("sets"):
            lines.append("  attic    %s: %s moved aside in %s (newest %s): `rofs attic %s`"
                         % (quote(attic["dir"]), count(attic["paths"], "saved change"),
                            count(attic["sets"], "set"), attic["newest"],
                            quote(e["state"])))
        reconciled = e.get("reconciled")
        if reconciled:
            counts = reconciled["counts"]
            lines.append("  image    changed; reconciled at this mount: %s%s" % (
                ", ".join("%d %s" % (n, a) for a, n in sorted(counts.items())) or
                "nothing to do", " (replaced versions in attic set %s)"
                % reconciled["attic"] if reconciled.get("attic") else ""))
            if counts.get("conflict") or counts.get("hidden"):
                lines.append("  WARNING  the reconcile left conflicts or hidden entries: "
                             "`rofs report %s` lists them" % quote(e["state"]))
        elif e.get("image_changed"):
            lines.append("  image    changed and not reconciled (on-image-change %s): "
                         "`rofs diff %s` tells stale copies and conflicts, `rofs reconcile` "
                         "merges them (unmounted)" % (e.get("on_image_change", "?"),
                                                      quote(e["state"])))
        if e.get("bases_dropped"):
            lines.append("  WARNING  %s of copy-ups not kept in the base store (copy-ups "
                         "came faster than they were written): an image update will call "
                         "those files conflicts instead of merging them"
                         % count(e["bases_dropped"], "text"))
        moved = e.get("moved_at_mount")
        if moved:
            lines.append("  WARNING  this mount moved %s the policy makes scratch into %s"
                         % (count(moved["count"], "saved change"), quote(moved["set"])))
        lines.append("  log      %s" % ("%s (%d events written, %d dropped)" % (
            quote(e["log"]), e["log_written"], e["log_dropped"]) if e["log"] else "off"))
        lines.append("  now      %d nodes, %d open files, %d open directories, %d copy-ups "
                     "running, %d internal errors" % (e["nodes"], e["open_files"],
                                                      e["open_dirs"], e["copy_ups"],
                                                      e["internal_errors"]))
    return "\n".join(lines) + "\n"


def revert(paths: list[str], state: str | None) -> tuple[list[str], list[str]]:
    """Revert each path; returns a line per path saying what happened, and the errors
    (a path that is nowhere is one: a typo must not look like success)."""
    out, errors = [], []
    for path in paths:
        try:
            out.append(_revert_one(path, state))
        except NoSuchPath as e:
            errors.append(str(e))
    return out, errors


class NoSuchPath(ToolError):
    """A path that is in neither layer (the other paths are still done; exit code 1)."""


NOWHERE = "no such file or directory in the lower layer or the state"


def _revert_one(path: str, state: str | None) -> str:
    from rofs import control
    shown = os.path.normpath(os.path.abspath(path))
    if state is not None:
        mount, rel = mount_for(state, path)
        live_socket = mount.live.socket if mount.live is not None else None
    else:
        mnt = rofs_mount_containing(path)
        if mnt is None:
            raise ToolError("%s is not on a live rofs mount; name its state dir with "
                            "--state" % quote(shown))
        rel = tuple(os.fsencode(c) for c in shown[len(mnt.rstrip("/")) + 1:].split("/")
                    if c)
        live_socket = runtime_path(mnt, ".sock")
        if live_socket is None:
            raise ToolError("cannot reach the daemon of %s ($XDG_RUNTIME_DIR is not "
                            "set): unmount it and use --state" % mnt)
        mount = None
    if not rel:
        raise ToolError("%s is a mount's root: name paths below it" % quote(shown))
    if live_socket is not None:
        try:
            reply = control.request(live_socket, {"op": "revert",
                                                  "path": [os.fsdecode(c) for c in rel]})
        except control.ControlError as e:
            if e.errno == errno.ENOENT:
                raise NoSuchPath("%s: %s" % (quote(shown), NOWHERE)) from None
            raise ToolError("%s: %s" % (quote(shown), e)) from None
        done = reply["reverted"]
    else:
        done = revert_offline(mount, rel)
        if not done and not os.path.lexists(os.path.join(
                mount.lower_root(), *map(os.fsdecode, rel))):
            raise NoSuchPath("%s: %s" % (quote(shown), NOWHERE))
    return "%s %s" % ("reverted" if done else "unchanged", quote(shown))


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


# ---------------------------------------------------------------- diff


@dataclass
class Change:
    path: str  # merged-view path
    status: str  # A (added), M (modified), D (deleted), R (replaced: a new object where
    #              the lower had another one, or an opaque directory)
    what: list[str] = field(default_factory=list)  # for M: content, mode, owner, ...
    renamed_from: str | None = None  # a moved lower directory
    kind: str = ""  # file, dir, symlink, ...
    # A copy against its origin and the lower now (IMAGE_STATES): "" for what is no copy
    image: str = ""
    # Where it is: components below the mount, and of its lower counterpart (None: none)
    rel: tuple[bytes, ...] = field(default=(), repr=False)
    lower: tuple[bytes, ...] | None = field(default=None, repr=False)

    def line(self) -> str:
        text = "%s %s" % (self.status, self.path)
        if self.what:
            text += "  (%s)" % ", ".join(self.what)
        if self.renamed_from:
            text += "  (renamed from %s)" % self.renamed_from
        if self.image in IMAGE_CHANGED:
            text += "  [image changed: %s]" % self.image
        return text


# What a copied-up object is to an image update (docs/image-updates.md).
IMAGE_STATES = {
    "here": "the image did not change it since the copy-up: a change made here",
    "stale": "the image changed it, this copy still equals what it was copied from",
    "metadata": "the image changed it, this copy changed only its metadata here",
    "conflict": "the image changed it, and this copy's content changed here too",
    "unknown": "copied up before rofs recorded origins, or too big to digest",
    "hides": "deleted or replaced here, hiding what the image changed or added since: a "
             "whiteout over a changed object, an opaque directory over new entries",
}
IMAGE_CHANGED = ("stale", "metadata", "conflict", "hides")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "?"


class Differ:
    """Walks one mount's upper layer against its lower layer."""

    def __init__(self, mount: Mount, markers: Markers | None = None) -> None:
        self.mount = mount
        self.markers = markers or mount.markers
        self.lower_root = mount.lower_root()
        self.changes: list[Change] = []

    def _show(self, rel: tuple[bytes, ...]) -> str:
        return quote_path(rel, quote(self.mount.mountpoint))

    def lower_path(self, rel: tuple[bytes, ...] | None) -> bytes | None:
        if rel is None:
            return None
        return os.fsencode(self.lower_root) + b"".join(b"/" + c for c in rel)

    def _xattrs(self, path: bytes) -> dict:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return {}
        out = {}
        for n in names:
            if self.markers.is_private(os.fsencode(n)):
                continue
            try:
                out[n] = os.getxattr(path, n, follow_symlinks=False)
            except OSError:
                pass
        return out

    def run(self, start: tuple[bytes, ...] = ()) -> list[Change]:
        """The changes at `start` and below.  The upper tree is walked with descriptors
        (a bounded number), never recursively: a user may have made it any depth."""
        root = open_listable(None, os.fsencode(self.mount.upper))
        try:
            if not start:
                walk_sorted(root, (), (), self._entry)
                return self.changes
            try:
                parent = open_below(root, start[:-1])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return self.changes  # nothing changed there
                raise
            try:
                if not os.path.lexists(proc_path(parent, start[-1])):
                    return self.changes
                merged = self._entry(parent, start[-1], start, self._parent_lower(root, start))
                if merged is not SKIP:
                    top = open_listable(parent, start[-1])
                    try:
                        walk_sorted(top, start, merged, self._entry)
                    finally:
                        os.close(top)
            finally:
                os.close(parent)
        finally:
            os.close(root)
        return self.changes

    def _parent_lower(self, root: int, rel):
        """The lower directory merged with rel's parent, following the upper's markers."""
        lower_dir: tuple[bytes, ...] | None = ()
        fd = open_listable(root, b".")
        try:
            for i in range(len(rel) - 1):
                lower_dir = self._merged(proc_path(fd, rel[i]), rel[:i + 1], lower_dir)
                try:
                    child = open_listable(fd, rel[i])
                except OSError:
                    break
                os.close(fd)
                fd = child
        finally:
            os.close(fd)
        return lower_dir

    def _merged(self, upper_path: bytes, rel, parent_lower):
        """The lower directory an upper directory merges with (None: none)."""
        try:
            st = os.lstat(upper_path)
        except FileNotFoundError:
            return None if parent_lower is None else parent_lower + (rel[-1],)
        if not stat.S_ISDIR(st.st_mode):
            return None
        if _getxattr(upper_path, self.markers.opaque) == b"y":
            return None
        redirect = _getxattr(upper_path, self.markers.redirect)
        if redirect is not None:
            if redirect.startswith(b"/"):
                return tuple(c for c in redirect.split(b"/") if c)
            return None if parent_lower is None else parent_lower + (redirect,)
        return None if parent_lower is None else parent_lower + (rel[-1],)

    def _entry(self, dir_fd: int, name: bytes, rel, parent_lower):
        """Record the change at upper entry dir_fd/name (merged path `rel`); for a
        directory, return the lower directory it merges with (what to walk it with),
        else SKIP."""
        upper_path = proc_path(dir_fd, name)
        ust = os.lstat(upper_path)
        lower_counterpart = None if parent_lower is None else parent_lower + (rel[-1],)
        lpath = self.lower_path(lower_counterpart)
        try:
            lst = os.lstat(lpath) if lpath is not None else None
        except (FileNotFoundError, NotADirectoryError):
            lst = None
        show = self._show(rel)
        if is_whiteout(ust):
            if lst is not None:
                self.changes.append(Change(show, "D", kind=_kind(lst.st_mode), rel=rel,
                                           lower=lower_counterpart, image=self._deleted(
                                               upper_path, lower_counterpart, lst)))
            return SKIP
        kind = _kind(ust.st_mode)
        before = len(self.changes)
        try:
            return self._changed(upper_path, ust, rel, show, kind, parent_lower,
                                 lower_counterpart, lpath, lst)
        finally:
            if len(self.changes) > before:
                change = self.changes[-1]
                change.rel, change.lower = rel, lower_counterpart
                change.image = self._image(upper_path, lower_counterpart, lpath, lst)

    def _image(self, upper_path: bytes, lower_counterpart, lpath: bytes | None,
               lst) -> str:
        """IMAGE_STATES for a changed upper object, from its origin marker: whether the
        lower changed since the copy-up, and what changed here."""
        value = _getxattr(upper_path, self.markers.origin)
        if value is None:
            return "unknown" if lst is not None else ""  # made here: no origin
        recorded = origin.parse(value)
        if recorded is None or not recorded.content_known():
            return "unknown"
        if _getxattr(upper_path, self.markers.opaque) == b"y":
            return "hides" if self.hidden_new(upper_path, lpath) else "here"
        if lower_counterpart is None or recorded.path != origin.path_digest(lower_counterpart):
            return "here"  # copied from elsewhere and moved here: a change made here
        private = self.markers.is_private
        now = origin.describe(lpath, private) if lst is not None else None
        if now is not None and now.same_object(recorded):
            return "here"
        here = origin.describe(upper_path, private)
        directory = recorded.kind == b"d"
        if (here.kind, here.content, here.size) != (recorded.kind, recorded.content,
                                                    recorded.size) and not directory:
            return "conflict"
        # (Not the mtime: it goes with the content, so a copy only touched here is stale.)
        if (here.mode, here.uid, here.gid, here.xattrs) != (
                recorded.mode, recorded.uid, recorded.gid, recorded.xattrs):
            return "metadata"
        return "stale"

    def _deleted(self, upper_path: bytes, lower_counterpart, lst) -> str:
        """IMAGE_STATES for a whiteout: "hides" when the lower object it hides is not
        the one deleted here (its origin: kind, size, mode, owner, mtime), else ""."""
        recorded = origin.parse(_getxattr(upper_path, self.markers.origin))
        if recorded is None or recorded.path != origin.path_digest(lower_counterpart):
            return ""
        now = origin.of(lst, origin.UNKNOWN, origin.UNKNOWN, lower_counterpart)
        return "" if now.same_object(recorded) else "hides"

    def hidden_new(self, upper_path: bytes, lpath: bytes | None) -> list[bytes]:
        """The entries of the lower directory an opaque upper directory hides that the
        lower did not have when the directory was made (its origin's listing in the
        base store); [] when that is not known."""
        recorded = origin.parse(_getxattr(upper_path, self.markers.origin))
        if recorded is None or recorded.kind != b"d" or lpath is None:
            return []
        then = origin.base(self.mount.bases, recorded.content)
        try:
            now = os.listdir(lpath)
        except OSError:
            return []
        if then is None:
            return []
        known = origin.unlisting(then)
        return sorted(n for n in now if n not in known)

    def _changed(self, upper_path, ust, rel, show, kind, parent_lower, lower_counterpart,
                 lpath, lst):
        """_entry's work for an upper object that is no whiteout."""
        if stat.S_ISDIR(ust.st_mode):
            merged = self._merged(upper_path, rel, parent_lower)
            if merged == lower_counterpart and (lst is None or not stat.S_ISDIR(lst.st_mode)):
                merged = None  # nothing below to merge with (a new directory)
            redirect = _getxattr(upper_path, self.markers.redirect)
            opaque = _getxattr(upper_path, self.markers.opaque) == b"y"
            if redirect is not None and merged is not None:
                self.changes.append(Change(show, "A", kind=kind, renamed_from=self._show(
                    merged)))
            elif lst is None:
                self.changes.append(Change(show, "A", kind=kind))
            elif opaque or not stat.S_ISDIR(lst.st_mode):
                self.changes.append(Change(show, "R", kind=kind,
                                           what=["replaced: the lower contents are hidden"]
                                           if opaque else ["was a %s" % _kind(lst.st_mode)]))
            else:
                what = self._meta(upper_path, ust, lpath, lst, directory=True)
                if what:
                    self.changes.append(Change(show, "M", what, kind=kind))
            return merged
        if lst is None:
            self.changes.append(Change(show, "A", kind=kind))
        elif _kind(lst.st_mode) != kind:
            self.changes.append(Change(show, "R", ["was a %s" % _kind(lst.st_mode)],
                                       kind=kind))
        else:
            what = []
            if stat.S_ISREG(ust.st_mode) and not _same_content(upper_path, lpath):
                what.append("content")
            if stat.S_ISLNK(ust.st_mode) and os.readlink(upper_path) != os.readlink(lpath):
                what.append("target")
            if (stat.S_ISCHR(ust.st_mode) or stat.S_ISBLK(ust.st_mode)) and \
                    ust.st_rdev != lst.st_rdev:
                what.append("device")
            what += self._meta(upper_path, ust, lpath, lst, directory=False)
            if what:
                self.changes.append(Change(show, "M", what, kind=kind))
        return SKIP

    def _meta(self, upper_path, ust, lpath, lst, directory: bool) -> list[str]:
        what = []
        if stat.S_IMODE(ust.st_mode) != stat.S_IMODE(lst.st_mode) and \
                not stat.S_ISLNK(ust.st_mode):
            what.append("mode %o -> %o" % (stat.S_IMODE(lst.st_mode),
                                           stat.S_IMODE(ust.st_mode)))
        if (ust.st_uid, ust.st_gid) != (lst.st_uid, lst.st_gid):
            what.append("owner %d:%d -> %d:%d" % (lst.st_uid, lst.st_gid, ust.st_uid,
                                                  ust.st_gid))
        # A directory's mtime changes with every entry added or removed: not reported.
        if not directory and ust.st_mtime_ns != lst.st_mtime_ns:
            what.append("mtime")
        if self._xattrs(upper_path) != self._xattrs(lpath):
            what.append("xattrs")
        return what


def _getxattr(path: bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _read(path: bytes):
    """A file of either layer, open for reading (the lower's atimes stay)."""
    return os.fdopen(open_noatime(path), "rb")


def _same_content(a: bytes, b: bytes) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with _read(a) as fa, _read(b) as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def _text(path: bytes | None) -> list[str] | None:
    """The lines of a text file (None: binary or unreadable); [] for no file."""
    if path is None:
        return []
    try:
        with _read(path) as f:
            data = f.read(4 << 20)
    except OSError:
        return None
    if b"\0" in data:
        return None
    return data.decode(errors="replace").splitlines(True)


def patch(differ: Differ, change: Change) -> str:
    """A unified diff of a text file's change (empty when there is none to show)."""
    if change.kind != "file" or change.status not in ("A", "M", "D"):
        return ""
    if change.status == "M" and "content" not in change.what:
        return ""
    mount = differ.mount
    rel = unquote(change.path[len(quote(mount.mountpoint).rstrip("/")) + 1:])
    comps = tuple(rel.split(b"/"))
    root = open_listable(None, os.fsencode(mount.upper))
    try:
        parent = differ._parent_lower(root, comps)
        lower = differ.lower_path(parent + (comps[-1],)) if parent is not None else None
        old = _text(lower if change.status != "A" else None)
        if change.status == "D":
            new = _text(None)
        else:
            upper_dir = open_below(root, comps[:-1])
            try:
                new = _text(proc_path(upper_dir, comps[-1]))
            finally:
                os.close(upper_dir)
    finally:
        os.close(root)
    if old is None or new is None:
        return "Binary file %s differs\n" % change.path
    return "".join(difflib.unified_diff(old, new, "a" + change.path, "b" + change.path))


def diff(state: str, path: str | None, *, as_json: bool = False,
         with_patch: bool = False, lower: str | None = None, ignore=None,
         summary: bool = False) -> str:
    """The changes of a state dir.  `lower`: compare with this directory instead of the
    lower layer the mount recorded (a copied state dir, next to the image it is for).
    `ignore`: a rofs.report.Patterns of paths to leave out; `summary`: counts per top
    directory and status instead of the changes."""
    if path is None:
        selected = [(m, ()) for m in mounts(state)]
    else:
        selected = [mount_for(state, path)]
    if lower is not None:
        _use_lower([m for m, _ in selected], lower, "name a PATH to say which one")
    out, records = [], []
    tops: dict[str, dict[str, int]] = {}
    left_out = 0
    for mount, rel in selected:
        differ = Differ(mount)
        base = quote(mount.mountpoint).rstrip("/")
        for change in differ.run(rel):
            if ignore is not None and ignore.match(change.path):
                left_out += 1
                continue
            counts = tops.setdefault(top_dir(base, change.path), {})
            counts[change.status] = counts.get(change.status, 0) + 1
            records.append({"path": change.path, "status": change.status,
                            "kind": change.kind, "what": change.what,
                            "renamed_from": change.renamed_from,
                            "image": change.image or None})
            out.append(change.line() + "\n")
            if with_patch:
                out.append(patch(differ, change))
    if summary:
        return _diff_summary(tops, len(records), left_out, as_json)
    if as_json:
        return json.dumps(records, indent=1) + "\n"
    return "".join(out)


def _diff_summary(tops: dict[str, dict[str, int]], total: int, left_out: int,
                  as_json: bool) -> str:
    if as_json:
        return json.dumps({"changes": total, "ignored": left_out, "directories": tops},
                          indent=1) + "\n"
    lines = ["%s (A added, M modified, D deleted, R replaced)%s"
             % (count(total, "change"), ", %d left out by --ignore" % left_out
                if left_out else "")]
    lines.append("  %6s %6s %6s %6s  %s" % ("A", "M", "D", "R", "directory"))
    for top, c in sorted(tops.items(), key=lambda item: (-sum(item[1].values()), item[0])):
        lines.append("  %6d %6d %6d %6d  %s" % (c.get("A", 0), c.get("M", 0), c.get("D", 0),
                                                 c.get("R", 0), top))
    return "\n".join(lines) + "\n"


def _use_lower(selected: list[Mount], lower: str, hint: str) -> None:
    """--lower DIR: the one selected mount's lower layer is DIR (not the recorded one)."""
    if len(selected) != 1:
        raise ToolError("the state dir serves %d mounts: %s --lower is for"
                        % (len(selected), hint))
    if not os.path.isdir(lower):
        raise ToolError("lower directory %s does not exist" % lower)
    selected[0].lower, selected[0].live = os.path.realpath(lower), None


# ---------------------------------------------------------------- revert (offline)


def locked_upper(mount: Mount) -> int:
    """The upper dir, locked like a mount locks it (refused while mounted)."""
    fd = os.open(mount.upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ToolError("%s is in use by a rofs mount" % mount.upper) from None
    return fd


def revert_offline(mount: Mount, rel: tuple[bytes, ...]) -> bool:
    """Drop the upper entry at `rel` of an unmounted mount; whether there was one."""
    if not rel:
        raise ToolError("cannot revert the mount's root; name a path below it")
    lock = locked_upper(mount)
    try:
        parent = open_listable(None, os.fsencode(
            os.path.join(mount.upper, *map(os.fsdecode, rel[:-1]))))
    except FileNotFoundError:
        os.close(lock)
        return False
    except OSError as e:
        os.close(lock)
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return False
        raise
    work = os.open(mount.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    index_fd = os.open(mount.index, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) \
        if os.path.isdir(mount.index) else None
    try:
        upper = UpperLayer(parent, work, mount.markers)
        upper.index_fd = index_fd
        if upper.try_stat(parent, rel[-1]) is None:
            return False
        index.detach(upper, parent, rel[-1])
        return True
    finally:
        for fd in (parent, work, lock) + ((index_fd,) if index_fd is not None else ()):
            os.close(fd)


# ---------------------------------------------------------------- check


@dataclass
class Problem:
    where: str
    what: str
    repair: object = None  # callable, or None when only a human can decide

    def line(self) -> str:
        return "%s: %s" % (self.where, self.what)


def check(state: str, repair: bool = False,
          lower: str | None = None) -> tuple[list[Problem], list[str]]:
    """Problems in every mount of a state dir; with `repair`, fixed where safe.
    `lower`: as for diff (a state dir of one mount only)."""
    problems: list[Problem] = []
    notes: list[str] = []
    selected = mounts(state)
    if lower is not None:
        _use_lower(selected, lower, "check them one by one; cannot tell which one")
    for mount in selected:
        lock = locked_upper(mount) if repair else None
        try:
            found = _check_mount(mount, mount.markers)
            problems += found
            if repair:
                for p in found:
                    if p.repair is not None:
                        p.repair()
                        notes.append("repaired: " + p.line())
        finally:
            if lock is not None:
                os.close(lock)
    return problems, notes


def _check_mount(mount: Mount, markers: Markers) -> list[Problem]:
    problems: list[Problem] = []
    work = mount.work
    if os.path.isdir(work):
        for name in sorted(os.listdir(work)):
            if name.startswith("#rofs."):
                path = os.path.join(work, name)
                problems.append(Problem(quote(path), "left over by an interrupted operation",
                                        lambda p=path: remove_path(p)))
    differ_lower = mount.lower_root()
    upper = os.fsencode(mount.upper)

    def lower_has(rel_lower) -> bool:
        if rel_lower is None:
            return False
        return os.path.lexists(os.path.join(differ_lower, *map(os.fsdecode, rel_lower)))

    def at(rel, action):
        """A repair of the upper entry at rel: found again when it runs (the walk's
        descriptors are closed by then)."""
        def repair() -> None:
            top = open_listable(None, upper)
            try:
                parent = open_below(top, rel[:-1])
            finally:
                os.close(top)
            try:
                action(proc_path(parent, rel[-1]))
            finally:
                os.close(parent)
        return repair

    def visit(dir_fd: int, name: bytes, crel, lower_dir):
        child = proc_path(dir_fd, name)
        st = os.lstat(child)
        shown = quote(upper + b"/" + b"/".join(crel))
        counterpart = None if lower_dir is None else lower_dir + (name,)
        opaque = _getxattr(child, markers.opaque)
        redirect = _getxattr(child, markers.redirect)
        ino = _getxattr(child, markers.ino)
        if ino is not None and not (ino.split() and ino.split()[0].isdigit()):
            problems.append(Problem(shown, "malformed %s marker %r" % (markers.ino.decode(),
                                                                       ino),
                                    at(crel, lambda c: os.removexattr(
                                        c, markers.ino, follow_symlinks=False))))
        if not stat.S_ISDIR(st.st_mode):
            for marker, value in ((markers.opaque, opaque), (markers.redirect, redirect)):
                if value is not None:
                    problems.append(Problem(shown, "%s on a %s (only directories carry it)"
                                            % (marker.decode(), _kind(st.st_mode)),
                                            at(crel, lambda c, m=marker: os.removexattr(
                                                c, m, follow_symlinks=False))))
            if is_whiteout(st) and not lower_has(counterpart):
                problems.append(Problem(shown, "whiteout over nothing (the lower has no "
                                        "such entry)", at(crel, os.unlink)))
            return SKIP
        if opaque not in (None, b"y"):
            problems.append(Problem(shown, "opaque marker with value %r" % opaque,
                                    at(crel, lambda c: os.setxattr(
                                        c, markers.opaque, b"y", follow_symlinks=False))))
        if redirect is not None:
            target = tuple(c for c in redirect.split(b"/") if c) \
                if redirect.startswith(b"/") else \
                (None if lower_dir is None else lower_dir + (redirect,))
            if target is None or not os.path.isdir(
                    os.path.join(differ_lower, *map(os.fsdecode, target))):
                problems.append(Problem(shown, "redirect to %r, which the lower does not "
                                        "have" % redirect))
            return target
        return None if opaque == b"y" else counterpart

    # Iterative, with bounded descriptors: a user may have made the tree any depth.
    root_fd = open_listable(None, upper)
    try:
        walk_sorted(root_fd, (), (), visit)
    finally:
        os.close(root_fd)
    return problems



