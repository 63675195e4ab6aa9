"""The attic: saved changes that rofs had to take out of the upper layer, kept aside.

No change of policy may delete what a host saved.  When a mount's policy makes scratch
a path whose changes the persistent upper layer holds (they were saved under an older
policy), the mount moves them here instead of deleting them, and says so:

    STATE/.rofs/attic/<MOUNTPOINT without leading />/<ID>/info.json
    STATE/.rofs/attic/<MOUNTPOINT ...>/<ID>/tree/...

`tree/` holds the moved entries at their paths below the mount, in the upper layer's
format (files, whiteouts, opaque and redirected directories, markers and all); the
directories above them are plain directories with the owner, mode and markers of the
upper directories they came from.  `info.json` says when, why, and which paths (escaped
as rofs.store.quoting writes them).  ID is the UTC time of the move, `YYYYmmddTHHMMSSZ` (with
`-2`, `-3`... when taken).  Each entry moves with one rename on the state filesystem,
so at every moment it is either in the upper layer or in the attic.

A set stays until the admin drops it (`rofs attic --drop`); `rofs attic --restore` puts
entries back into the upper layer (through the daemon of a live mount, whose kernel
caches it invalidates, or here, under the upper layer's lock, when nothing is mounted:
rofs/commands/attic.py chooses).
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field

from rofs._sys import RENAME_NOREPLACE, proc_path, renameat2
from rofs.store import copyup, index
from rofs.store.layers import (
    UpperLayer,
    getxattr_or_none,
    open_below,
    open_listable,
    remove_path,
    visit_tree,
)
from rofs.store.quoting import count, quote, quote_path, unquote
from rofs.store.registry import ToolError, locked_upper
from rofs.store.state import PRIVATE_DIR, mount_name

log = logging.getLogger(__name__)

ATTIC_DIR = "attic"
INFO = "info.json"
TREE = "tree"

Path = tuple[bytes, ...]


def attic_dir(state: str, mountpoint: str) -> str:
    return os.path.join(state, PRIVATE_DIR, ATTIC_DIR, mount_name(mountpoint))


def _new_id(base: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = stamp, 1
    while os.path.lexists(os.path.join(base, name)):
        n += 1
        name = "%s-%d" % (stamp, n)
    return name


def _write_info(directory: str, info: dict) -> None:
    path = os.path.join(directory, INFO)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


@dataclass
class Moved:
    """What one mount moved into the attic."""

    set_dir: str
    paths: list[Path] = field(default_factory=list)


class Aside:
    """A new attic set under `base`, filled one entry at a time: `move` takes an entry
    out of the upper layer, `link` keeps a second name of one about to be replaced (a
    regular file or symlink), so at every moment the entry is in the upper layer or the
    attic, or both.  The set is made at the first entry; `close` marks it complete."""

    def __init__(self, upper: UpperLayer, base: str, mountpoint: str, reason: str,
                 paths: list[Path]) -> None:
        self.upper, self.base, self.mountpoint = upper, base, mountpoint
        self.info = {"id": "", "time": time.time(), "mountpoint": mountpoint,
                     "reason": reason, "paths": [quote_path(p, mountpoint) for p in paths],
                     "complete": False}
        self.set_dir: str | None = None
        self.taken: list[Path] = []
        self._tree = -1
        self._keys: collections.Counter = collections.Counter()

    def _open(self) -> int:
        if self._tree < 0:
            os.makedirs(self.base, mode=0o700, exist_ok=True)
            if os.stat(self.base).st_dev != self.upper.dev:
                raise OSError(errno.EXDEV, "the attic %s is not on the upper layer's "
                              "filesystem" % self.base)
            self.set_dir = os.path.join(self.base, _new_id(self.base))
            os.mkdir(self.set_dir, 0o700)
            os.mkdir(os.path.join(self.set_dir, TREE), 0o755)
            self.info["id"] = os.path.basename(self.set_dir)
            _write_info(self.set_dir, self.info)
            self._tree = os.open(os.path.join(self.set_dir, TREE),
                                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._tree

    def _take(self, path: Path, keep: bool) -> None:
        tree = self._open()
        src = open_below(self.upper.root_fd, path[:-1])
        try:
            dst = _attic_parents(self.upper, tree, path[:-1])
            try:
                if keep:
                    if self.upper.try_stat(dst, path[-1]) is not None:
                        os.unlink(path[-1], dir_fd=dst)  # an interrupted run's link
                    os.link(path[-1], path[-1], src_dir_fd=src, dst_dir_fd=dst,
                            follow_symlinks=False)
                else:
                    inside = index.index_keys(self.upper, src, path[-1])
                    renameat2(src, path[-1], dst, path[-1], RENAME_NOREPLACE)
                    self._keys += inside  # only once they have moved
                self.taken.append(path)
            finally:
                if dst != tree:
                    os.close(dst)
        finally:
            os.close(src)

    def move(self, path: Path) -> None:
        self._take(path, keep=False)

    def link(self, path: Path) -> None:
        self._take(path, keep=True)

    def close(self, complete: bool = True) -> None:
        if self._tree < 0:
            return
        os.close(self._tree)
        self._tree = -1
        index.drop_index_entries(self.upper, self._keys)
        self.info["paths"] = [quote_path(p, self.mountpoint) for p in self.taken]
        self.info["complete"] = complete
        _write_info(self.set_dir, self.info)


def move_aside(upper: UpperLayer, paths: list[Path], base: str, mountpoint: str,
               reason: str) -> Moved | None:
    """Move the upper entries at `paths` (none inside another) into a new attic set
    under `base`; None when `paths` is empty."""
    if not paths:
        return None
    aside = Aside(upper, base, mountpoint, reason, paths)
    aside._open()
    moved = Moved(aside.set_dir)
    try:
        for path in paths:
            aside.move(path)
            moved.paths.append(path)
    finally:
        aside.close(len(moved.paths) == len(paths))
    return moved


def _mkdir_like(markers, like: bytes, dir_fd: int, name: bytes) -> None:
    """A plain directory dir_fd/name with the owner, mode, times and overlay markers
    (opaque, redirect) of the directory at `like`: the directories above an entry set
    aside, and made again above one restored."""
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    extra = {}
    for marker in (markers.opaque, markers.redirect):
        value = getxattr_or_none(like, marker)
        if value is not None:
            extra[marker] = value
    copyup.copy_meta(os.lstat(like), proc_path(dir_fd, name), markers.is_private, None,
                     extra=extra)


def _attic_parents(upper: UpperLayer, tree: int, path: Path) -> int:
    """The attic directory for `path` (made like the upper directories on the way)."""
    fd = tree
    up = upper.root_fd
    opened = []
    try:
        for name in path:
            up_child = open_listable(up, name)
            opened.append(up_child)
            if upper.try_stat(fd, name) is None:
                _mkdir_like(upper.markers, proc_path(up, name), fd, name)
            child = open_listable(fd, name)
            if fd != tree:
                os.close(fd)
            fd = child
            up = up_child
        return fd
    finally:
        for o in opened:
            os.close(o)


# ---------------------------------------------------------------- the tools' side


@dataclass
class AtticSet:
    """One set of entries moved aside, as `rofs attic` shows it."""

    mountpoint: str  # escaped
    id: str
    directory: str
    time: float
    reason: str
    paths: list[str]  # escaped, as the mount shows them
    present: list[str]  # those still in the attic (not restored)
    complete: bool

    @property
    def tree(self) -> str:
        return os.path.join(self.directory, TREE)

    def relative(self, shown: str) -> Path:
        """The components below the mount of one of this set's paths."""
        base = self.mountpoint.rstrip("/")
        return tuple(c for c in unquote(shown[len(base) + 1:]).split(b"/") if c)

    def source(self, shown: str) -> bytes:
        """Where the entry for `shown` is in the attic."""
        return os.path.join(os.fsencode(self.tree), *self.relative(shown))


def sets(state: str) -> list[AtticSet]:
    """Every attic set of a state dir, oldest first."""
    top = os.path.join(state, PRIVATE_DIR, ATTIC_DIR)
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        if INFO not in filenames:
            continue
        dirnames[:] = []  # a set's tree is not searched for more sets
        try:
            with open(os.path.join(dirpath, INFO)) as f:
                info = json.load(f)
            mountpoint, paths = info["mountpoint"], list(info["paths"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        s = AtticSet(mountpoint, os.path.basename(dirpath), dirpath,
                     float(info.get("time", 0)), str(info.get("reason", "")), paths, [],
                     bool(info.get("complete", True)))
        s.present = [p for p in paths if os.path.lexists(s.source(p))]
        out.append(s)
    out.sort(key=lambda s: (s.time, s.mountpoint, s.id))
    return out


def summary(state: str, mountpoint: str) -> dict:
    """For `rofs status`: how many sets and entries the attic holds for a mount."""
    mine = [s for s in sets(state) if s.mountpoint == quote(mountpoint) and s.present]
    return {"sets": len(mine), "paths": sum(len(s.present) for s in mine),
            "newest": mine[-1].id if mine else None,
            "dir": attic_dir(state, mountpoint)}


def select(state: str, set_id: str) -> list[AtticSet]:
    chosen = [s for s in sets(state) if s.id == set_id]
    if not chosen:
        known = ", ".join(s.id for s in sets(state)) or "none"
        raise ToolError("%s has no attic set %s (sets: %s)" % (state, set_id, known))
    return chosen


def format_sets(found: list[AtticSet]) -> str:
    """`rofs attic`: each set, then its paths still there."""
    if not found:
        return "the attic is empty\n"
    lines = []
    for s in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.time))
        restored = len(s.paths) - len(s.present)
        lines.append("%s  %s  %s, %s%s%s" % (
            s.id, s.mountpoint, when, count(len(s.present), "path"),
            " (%d restored)" % restored if restored else "",
            "" if s.complete else " (the move was interrupted)"))
        lines.append("  why: %s" % s.reason)
        lines += ["  %s" % p for p in s.present]
    return "\n".join(lines) + "\n"


def restore_offline(mount, s: AtticSet, shown: str) -> None:
    rel = s.relative(shown)
    lock = locked_upper(mount)
    opened: list[int] = []
    try:
        upper = UpperLayer(lock, lock, mount.markers)
        if mount.index and os.path.isdir(mount.index):
            upper.index_fd = os.open(mount.index, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            opened.append(upper.index_fd)
        fd, attic_fd = lock, open_listable(None, os.fsencode(s.tree))
        opened.append(attic_fd)
        for name in rel[:-1]:
            attic_fd = open_listable(attic_fd, name)
            opened.append(attic_fd)
            if upper.try_stat(fd, name) is None:
                # The upper directory went (reverted?): made again like the one set aside.
                _mkdir_like(upper.markers, proc_path(attic_fd), fd, name)
            fd = open_listable(fd, name)
            opened.append(fd)
        if upper.try_stat(fd, rel[-1]) is not None:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        renameat2(attic_fd, rel[-1], fd, rel[-1], RENAME_NOREPLACE)
        index.relink_index(upper, fd, rel[-1])
    finally:
        for o in reversed(opened):
            os.close(o)
        os.close(lock)


def drop_if_empty(s: AtticSet) -> None:
    """A set whose every entry went back is removed (only directories are left)."""
    if any(os.path.lexists(s.source(p)) for p in s.paths):
        return
    files: list[bytes] = []

    def visit(fd: int, name: bytes, st: os.stat_result) -> None:
        if not stat.S_ISDIR(st.st_mode):
            files.append(name)

    top = open_listable(None, os.fsencode(s.directory))
    try:
        visit_tree(top, TREE.encode(), visit)
    finally:
        os.close(top)
    if not files:
        remove_path(s.directory)


def drop(state: str, set_id: str) -> list[str]:
    """Delete an attic set for good (the admin's decision)."""
    out = []
    for s in select(state, set_id):
        remove_path(s.directory)
        out.append("dropped %s (%s, %s)" % (s.id, s.mountpoint,
                                            count(len(s.present), "path")))
    return out
