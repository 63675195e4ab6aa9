"""What changed: one mount's upper layer walked against its lower layer.

Each upper entry is a change (added, modified and how, deleted, replaced, a renamed
lower directory) and, for a copy-up, what it is to an image update (IMAGE_STATES, from
its origin marker against the lower now).  `rofs diff` prints them; reconcile acts on
them (docs/state-tools.md, docs/image-updates.md).  The upper tree is walked with
bounded descriptors, never recursively: a user may have made it any depth.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from rofs._sys import open_noatime, proc_path
from rofs.store import origin
from rofs.store.layers import (
    SKIP,
    Markers,
    is_whiteout,
    open_below,
    open_listable,
    walk_sorted,
)
from rofs.store.quoting import quote, quote_path
from rofs.store.registry import Mount


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


def kind_of(mode: int) -> str:
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
                merged = self._entry(parent, start[-1], start, self.parent_lower(root, start))
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

    def parent_lower(self, root: int, rel):
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
        if read_xattr(upper_path, self.markers.opaque) == b"y":
            return None
        redirect = read_xattr(upper_path, self.markers.redirect)
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
                self.changes.append(Change(show, "D", kind=kind_of(lst.st_mode), rel=rel,
                                           lower=lower_counterpart, image=self._deleted(
                                               upper_path, lower_counterpart, lst)))
            return SKIP
        kind = kind_of(ust.st_mode)
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
        value = read_xattr(upper_path, self.markers.origin)
        if value is None:
            return "unknown" if lst is not None else ""  # made here: no origin
        recorded = origin.parse(value)
        if recorded is None or not recorded.content_known():
            return "unknown"
        if read_xattr(upper_path, self.markers.opaque) == b"y":
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
        recorded = origin.parse(read_xattr(upper_path, self.markers.origin))
        if recorded is None or recorded.path != origin.path_digest(lower_counterpart):
            return ""
        now = origin.of(lst, origin.UNKNOWN, origin.UNKNOWN, lower_counterpart)
        return "" if now.same_object(recorded) else "hides"

    def hidden_new(self, upper_path: bytes, lpath: bytes | None) -> list[bytes]:
        """The entries of the lower directory an opaque upper directory hides that the
        lower did not have when the directory was made (its origin's listing in the
        base store); [] when that is not known."""
        recorded = origin.parse(read_xattr(upper_path, self.markers.origin))
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
            redirect = read_xattr(upper_path, self.markers.redirect)
            opaque = read_xattr(upper_path, self.markers.opaque) == b"y"
            if redirect is not None and merged is not None:
                self.changes.append(Change(show, "A", kind=kind, renamed_from=self._show(
                    merged)))
            elif lst is None:
                self.changes.append(Change(show, "A", kind=kind))
            elif opaque or not stat.S_ISDIR(lst.st_mode):
                self.changes.append(Change(show, "R", kind=kind,
                                           what=["replaced: the lower contents are hidden"]
                                           if opaque else ["was a %s" % kind_of(lst.st_mode)]))
            else:
                what = self._meta(upper_path, ust, lpath, lst, directory=True)
                if what:
                    self.changes.append(Change(show, "M", what, kind=kind))
            return merged
        if lst is None:
            self.changes.append(Change(show, "A", kind=kind))
        elif kind_of(lst.st_mode) != kind:
            self.changes.append(Change(show, "R", ["was a %s" % kind_of(lst.st_mode)],
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


def read_xattr(path: bytes, name: bytes) -> bytes | None:
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


def text_lines(path: bytes | None) -> list[str] | None:
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
