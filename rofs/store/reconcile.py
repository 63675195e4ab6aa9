"""Reconcile a host's state with a new image: `rofs reconcile`, and every mount that
finds the image changed (--on-image-change, docs/image-updates.md).

`rofs diff` tells what each copy is to the image (rofs.store.differ.IMAGE_STATES, from the copy's
origin marker); reconcile acts on the copies the image changed:

- stale (the copy still equals what it was copied from): moved out, so the new image's
  file shows;
- metadata (changed here in mode, owner or xattrs only): the new image's content, with
  each of those fields changed here kept and the others (and the mtime) the image's;
- conflict (content changed on both sides): passwd, group, shadow, gshadow, subuid and
  subgid merged per entry; other text merged three-way with merge3 against the content
  at copy-up (the base store, rofs/store/origin.py; the merges, rofs/store/merge.py);
  when that merge conflicts, or the file is binary, or its base is gone, the host's
  file stays and the image's version is written beside it as NAME.rofs-new (as dpkg's
  .dpkg-dist);
- hides (an opaque directory hides entries the image added, a whiteout an object the
  image changed since): reported; with `unhide` the new entries are copied into the
  directory, the whiteout moved to the attic.

Afterwards the mount's base store keeps only what some origin still refers to.

Each replacement is one rename of a prepared copy (which carries the new origin, so a
rerun finds nothing left to do there); what it replaces is first linked into an attic
set (rofs/store/attic.py), so `rofs attic` lists it until the admin drops it.  A kill at any
point leaves every file old or new; the next run finishes the job.  Every action goes
into the write log (op `reconcile`), which `rofs report` summarizes per host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from rofs import crash
from rofs._sys import RENAME_NOREPLACE, open_noatime, proc_path, renameat2, write_all
from rofs.store import attic, copyup, merge, origin
from rofs.store import state as state_mod
from rofs.store.differ import IMAGE_CHANGED, Change, Differ, read_xattr
from rofs.store.layers import UpperLayer, open_below, open_listable, remove_tree, visit_tree
from rofs.store.quoting import quote, quote_path
from rofs.store.registry import Live, Mount, ToolError
from rofs.store.writelog import append_events

log = logging.getLogger(__name__)

NEW_SUFFIX = b".rofs-new"  # the image's version of a file in conflict, beside it

# What reconcile did to a path (the write log's "action").
ACTIONS = {
    "took": "the image's new version shows (the copy here had not changed)",
    "merged": "the image's changes and this host's, merged",
    "kept": "this host's version kept (the image removed or changed it, and so did this "
            "host; nothing of the image's to merge)",
    "conflict": "changed here and in the image: see the detail and NAME.rofs-new",
    "hidden": "an opaque directory here hides entries the image added",
    "unhidden": "entries the image added copied into the opaque directory here",
}


def _order(name: bytes) -> tuple:
    """passwd before shadow, group before gshadow, each before its backup."""
    kind = merge.account_kind(name)
    if kind is None:
        return (name, 0, b"")
    return (merge.SHADOWED_BY.get(kind, kind), kind in merge.SHADOWED_BY, name)


@dataclass
class Action:
    path: str  # as the mount shows it (escaped)
    action: str  # ACTIONS
    detail: str
    beside: str | None = None  # the NAME.rofs-new written

    def line(self) -> str:
        text = "%-9s %s  (%s)" % (self.action, self.path, self.detail)
        if self.beside:
            text += "; the image's version: %s" % self.beside
        return text

    def as_dict(self) -> dict:
        return {"path": self.path, "action": self.action, "detail": self.detail,
                "beside": self.beside}


@dataclass
class Result:
    mountpoint: str
    actions: list[Action] = field(default_factory=list)
    attic: str | None = None  # the attic set holding what was replaced
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.actions:
            out[a.action] = out.get(a.action, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = ["%d %s" % (c[k], k) for k in ACTIONS if c.get(k)]
        return "%s%s: %s%s" % ("would reconcile " if self.dry_run else "reconciled ",
                              self.mountpoint, ", ".join(parts) or "nothing to do",
                              "; replaced versions kept in attic set %s"
                              % os.path.basename(self.attic) if self.attic else "")


# ---------------------------------------------------------------- merges


# ---------------------------------------------------------------- reconcile


class Reconciler:
    """Reconcile one mount's upper layer (which the caller has locked) with its lower."""

    def __init__(self, mount: Mount, *, dry_run: bool = False, unhide: bool = False,
                 work_fd: int | None = None) -> None:
        self.mount = mount
        self.dry_run = dry_run
        self.unhide = unhide
        self.differ = Differ(mount)
        self.markers = self.differ.markers
        self.result = Result(quote(mount.mountpoint), dry_run=dry_run)
        self.root = open_listable(None, os.fsencode(mount.upper))
        self.work = work_fd if work_fd is not None else os.open(
            mount.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._own_work = work_fd is None
        self.upper = UpperLayer(self.root, self.work, self.markers)
        self.bases = mount.bases
        self.bases_fd = os.open(self.bases, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) \
            if os.path.isdir(self.bases) else None
        self.aside: attic.Aside | None = None
        self.left_out: dict[bytes, set[bytes]] = {}  # account file -> names left out
        self._sets: list | None = None  # the mount's attic sets (_attic_links)

    def close(self) -> None:
        for fd in (self.root,) + ((self.work,) if self._own_work else ()) + \
                ((self.bases_fd,) if self.bases_fd is not None else ()):
            os.close(fd)

    def run(self, start: tuple[bytes, ...] = ()) -> Result:
        changes = [c for c in self.differ.run(start) if c.image in IMAGE_CHANGED]
        if changes and not self.dry_run:
            self.aside = attic.Aside(
                self.upper, attic.attic_dir(self.mount.state, self.mount.mountpoint),
                quote(self.mount.mountpoint), "reconcile with a new image: the versions "
                "it replaced", [c.rel for c in changes])
        # Account files in an order where passwd comes before shadow, group before
        # gshadow (a name left out of one is left out of the other).
        changes.sort(key=lambda c: (c.rel[:-1], _order(c.rel[-1])))
        try:
            for change in changes:
                self._one(change)
        finally:
            if self.aside is not None:
                self.aside.close()
                self.result.attic = self.aside.set_dir
        if not self.dry_run and not start:
            self._collect_garbage()
        return self.result

    def _collect_garbage(self) -> None:
        """Drop the bases no origin of this mount refers to any more (in its upper
        layer or its attic sets): what versions the last reconcile replaced were
        based on.  The caller holds the mount's lock, so no copy-up adds one meanwhile."""
        if self.bases_fd is None:
            return
        used = set()

        def visit(fd: int, name: bytes, st) -> None:
            recorded = origin.parse(read_xattr(proc_path(fd, name), self.markers.origin))
            if recorded is not None:
                used.add(recorded.content)

        visit_tree(self.root, b".", visit)
        shown = quote(self.mount.mountpoint)
        for s in attic.sets(self.mount.state):
            if s.mountpoint == shown and os.path.isdir(s.tree):
                tree = open_listable(None, os.fsencode(s.tree))
                try:
                    visit_tree(tree, b".", visit)
                finally:
                    os.close(tree)
        dropped = 0
        for name in os.listdir(os.fsencode(self.bases)):
            if name not in used:
                try:
                    os.unlink(name, dir_fd=self.bases_fd)
                    dropped += 1
                except OSError as e:
                    log.warning("base store: cannot drop %s: %s", name, e.strerror)
        if dropped:
            log.info("base store: dropped %d bases nothing refers to any more", dropped)

    def _act(self, change: Change, action: str, detail: str, beside: bytes | None = None
             ) -> None:
        shown = None
        if beside is not None:
            shown = quote_path(change.rel[:-1] + (beside,), quote(self.mount.mountpoint))
        self.result.actions.append(Action(change.path, action, detail, shown))

    def _one(self, change: Change) -> None:
        parent = open_below(self.root, change.rel[:-1])
        try:
            name = change.rel[-1]
            here = proc_path(parent, name)
            lower = self.differ.lower_path(change.lower)
            st = os.lstat(here)
            lst = _lstat(lower)
            if change.image == "hides" and not stat.S_ISDIR(st.st_mode):
                self._deleted(change, parent, lst)
            elif change.image == "hides":
                self._hides(change, parent, name, here, lower)
            elif stat.S_ISDIR(st.st_mode):
                self._directory(change, here, lower, lst)
            elif stat.S_ISREG(st.st_mode) and \
                    st.st_nlink - self._attic_links(change.rel, st) > 1:
                self._act(change, "kept", "a hard link here: left as it is")
            elif change.image == "stale":
                if not self.dry_run:
                    self.aside.move(change.rel)
                    self._synced(parent)
                    crash.point("reconcile:replaced")
                self._act(change, "took", "unchanged here since its copy-up" + (
                    "; the image removed it" if lst is None else "" if kind_of(lst) == kind_of(st)
                    else "; the image's is a %s now" % kind_of(lst)))
            elif lst is None or kind_of(lst) != kind_of(st):
                self._act(change, "kept", "changed here; the image removed it" if lst is None
                          else "changed here; the image's is a %s now" % kind_of(lst))
            elif change.image == "metadata":
                fields = self._replace(change, parent, name, st, lower, lst, None)
                self._act(change, "merged", "the image's content, with the %s changed here"
                          % (", ".join(fields) or "nothing"))
            else:
                self._conflict(change, parent, name, st, here, lower, lst)
        finally:
            os.close(parent)

    def _attic_links(self, rel: tuple[bytes, ...], st) -> int:
        """How many names of the inode `st` (at `rel`) earlier reconciles left in the
        attic: one killed after linking a version aside and before replacing it left
        the version with a second name there, which makes it no hard link."""
        if self._sets is None:
            shown = quote(self.mount.mountpoint)
            self._sets = [s for s in attic.sets(self.mount.state) if s.mountpoint == shown]
        n = 0
        for s in self._sets:
            try:
                other = os.lstat(os.path.join(os.fsencode(s.tree), *rel))
            except OSError:
                continue
            n += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
        return n

    # -- files

    def _conflict(self, change, parent, name, st, here, lower, lst) -> None:
        recorded = origin.parse(read_xattr(here, self.markers.origin))
        base = origin.base(self.bases, recorded.content) if recorded else None
        merged, conflicts = None, []
        if not stat.S_ISREG(st.st_mode):
            why = "a %s changed on both sides" % kind_of(st)
        elif base is None:
            why = "its content at copy-up is not known (no base kept)"
        elif max(st.st_size, lst.st_size) > origin.BASE_LIMIT:
            why = "too big to merge"
        else:
            mine, theirs = _read(here), _read(lower)
            why = "binary"
            if b"\0" not in mine and b"\0" not in theirs:
                kind = merge.account_kind(name)
                if not all(map(merge.entry_lines, (base, mine, theirs))):
                    kind = None  # named like one, but no account file: merged as text
                if kind in merge.ACCOUNTS:
                    source = merge.SHADOWED_BY.get(kind, kind) + name[len(kind):]
                    merged, conflicts = merge.merge_accounts(
                        kind, base, mine, theirs,
                        self.left_out.setdefault(change.rel[:-1] + (source,), set()))
                elif kind in merge.RANGES:
                    merged, conflicts = merge.merge_ranges(base, mine, theirs)
                else:
                    try:
                        merged = merge.merge_text(base, mine, theirs)
                        why = "the changes here and the image's overlap"
                    except ImportError:
                        why = "no text merge: merge3 is not installed (pip install merge3)"
        if merged is not None:
            fields = self._replace(change, parent, name, st, lower, lst, merged)
            if not conflicts:
                self._act(change, "merged", "the image's changes and this host's" + (
                    " (%s changed here kept)" % ", ".join(fields) if fields else ""))
                return
            beside = self._beside(parent, name, lower, lst)
            self._act(change, "conflict", "merged but for: " + "; ".join(conflicts), beside)
            return
        beside = self._beside(parent, name, lower, lst) if stat.S_ISREG(st.st_mode) else None
        self._settle_origin(parent, name, lower, change)
        self._act(change, "conflict", "%s: this host's version kept" % why, beside)

    def _replace(self, change: Change, parent: int, name: bytes, st, lower: bytes, lst,
                 content: bytes | None) -> list[str]:
        """Put a new copy at parent/name: the image's object (`content` instead of its
        data, when given), with the metadata fields changed here kept; returns those."""
        here = proc_path(parent, name)
        recorded = origin.parse(read_xattr(here, self.markers.origin))
        mine = origin.describe(here, self.markers.is_private)
        chosen, kept = _fields(recorded, mine, lst)
        if content is not None:
            chosen.st_mtime_ns = time.time_ns()
        if self.dry_run:
            return kept
        tmp = self.upper.temp_name()
        try:
            if stat.S_ISREG(lst.st_mode):
                if content is None:
                    _new_file(self.work, tmp, copy_of=lower, size=lst.st_size)
                else:
                    _new_file(self.work, tmp, data=content)
            elif stat.S_ISLNK(lst.st_mode):
                os.symlink(os.readlink(lower), tmp, dir_fd=self.work)
            else:
                os.mknod(tmp, stat.S_IFMT(lst.st_mode) | 0o600, lst.st_rdev, dir_fd=self.work)
            extra = self._markers_of(here)
            extra[self.markers.origin] = self._origin_of(lower, change.lower)
            copyup.copy_meta(chosen, self.upper.work_path(tmp), self.markers.is_private,
                             here if "xattrs" in kept else lower, extra=extra)
            self.aside.link(change.rel)
            crash.point("reconcile:linked")
            renameat2(self.work, tmp, parent, name, 0)
        except BaseException:
            _discard(self.work, tmp)
            raise
        self._synced(parent)
        crash.point("reconcile:replaced")
        return kept

    def _beside(self, parent: int, name: bytes, lower: bytes, lst) -> bytes | None:
        """Write the image's version of parent/name as NAME.rofs-new (replacing one an
        earlier run wrote); None when that name holds something else."""
        new = name + NEW_SUFFIX
        old = self.upper.try_stat(parent, new)
        if old is not None and not stat.S_ISREG(old.st_mode):
            return None
        if self.dry_run:
            return new
        tmp = self.upper.temp_name()
        try:
            _new_file(self.work, tmp, copy_of=lower, size=lst.st_size)
            copyup.copy_meta(lst, self.upper.work_path(tmp), self.markers.is_private, lower)
            if lst.st_mode & 0o6000:  # a copy to look at, not to run
                os.chmod(self.upper.work_path(tmp), stat.S_IMODE(lst.st_mode) & ~0o6000)
            renameat2(self.work, tmp, parent, new, 0)
        except BaseException:
            _discard(self.work, tmp)
            raise
        self._synced(parent)
        return new

    def _settle_origin(self, parent: int, name: bytes, lower: bytes, change: Change) -> None:
        """A conflict kept as it is here: its origin becomes the image's object, so the
        next update merges against the version this host chose to keep."""
        if self.dry_run:
            return
        os.setxattr(proc_path(parent, name), self.markers.origin,
                    self._origin_of(lower, change.lower), follow_symlinks=False)
        self._synced(parent)
        crash.point("reconcile:replaced")

    def _origin_of(self, lower: bytes, rel: tuple[bytes, ...]) -> bytes:
        """The origin marker for a copy of the lower object at `lower` (its text kept in
        the base store for the next merge)."""
        st = os.lstat(lower)
        private = self.markers.is_private
        if not stat.S_ISREG(st.st_mode):
            return origin.of(st, origin.content_digest(st, lower),
                             origin.xattrs_digest(lower, private), rel).encode()
        fd = open_noatime(lower, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            found, data = origin.of_regular(fd, st, rel, private)
        finally:
            os.close(fd)
        if data is not None:
            self._keep(found.content, data)
        return found.encode()

    def _keep(self, content: bytes, data: bytes) -> bool:
        """Keep a text in the base store now; whether it is there."""
        if self.bases_fd is None:
            return False
        try:
            return origin.keep_base(self.bases_fd, content, data)
        except OSError as e:
            log.warning("base store: cannot keep %s: %s", content.decode(), e.strerror)
            return False

    def _markers_of(self, path: bytes) -> dict[bytes, bytes]:
        """The overlay markers an object carries (rofs's own: its inode number...)."""
        out = {}
        for n in _listxattr(path):
            if self.markers.is_private(n) and n != self.markers.origin:
                value = read_xattr(path, n)
                if value is not None:
                    out[n] = value
        return out

    # -- directories

    def _directory(self, change: Change, here: bytes, lower: bytes, lst) -> None:
        """A directory copied up whose lower changed its metadata: each field not
        changed here takes the image's value, in place."""
        if lst is None or not stat.S_ISDIR(lst.st_mode):
            self._act(change, "kept", "the image has no directory here now")
            return
        recorded = origin.parse(read_xattr(here, self.markers.origin))
        mine = origin.describe(here, self.markers.is_private)
        chosen, kept = _fields(recorded, mine, lst)
        chosen.st_mtime_ns = os.lstat(here).st_mtime_ns
        if not self.dry_run:
            if "xattrs" not in kept:
                for n in _listxattr(here):
                    if not self.markers.is_private(n):
                        os.removexattr(here, n, follow_symlinks=False)
            copyup.copy_meta(chosen, here, self.markers.is_private,
                             None if "xattrs" in kept else lower,
                             extra={self.markers.origin: self._origin_of(lower, change.lower)})
            crash.point("reconcile:replaced")
        self._act(change, "took" if not kept else "merged",
                  "the image's metadata" + (", with the %s changed here" % ", ".join(kept)
                                            if kept else ""))

    def _deleted(self, change: Change, parent: int, lst) -> None:
        """A whiteout hiding a lower object the image changed since it was deleted here:
        reported; with `unhide`, moved to the attic, so the image's version shows."""
        if not self.unhide:
            self._act(change, "hidden", "deleted here; the image changed it since (a %s "
                      "now), which the deletion hides (reconcile --unhide shows it)"
                      % kind_of(lst))
            return
        if not self.dry_run:
            self.aside.move(change.rel)
            self._synced(parent)
            crash.point("reconcile:replaced")
        self._act(change, "unhidden", "deleted here; the image's new version shows")

    def _hides(self, change: Change, parent: int, name: bytes, here: bytes,
               lower: bytes) -> None:
        new = self.differ.hidden_new(here, lower)
        shown = ", ".join(quote(n) for n in new[:10]) + (" and %d more" % (len(new) - 10)
                                                         if len(new) > 10 else "")
        if not self.unhide:
            self._act(change, "hidden", "replaced here; the image added %s there since, "
                      "which it hides (reconcile --unhide copies them in)" % shown)
            return
        if not self.dry_run:
            fd = open_listable(parent, name)
            try:
                for n in new:
                    if self.upper.try_stat(fd, n) is None:
                        self._copy_in(lower + b"/" + n, change.lower + (n,), fd, n)
            finally:
                os.close(fd)
            # The listing it hides is now the image's.
            found = origin.listed(os.listdir(lower))
            if found is not None and self._keep(*found):
                recorded = origin.parse(read_xattr(here, self.markers.origin))
                os.setxattr(here, self.markers.origin, dataclasses.replace(
                    recorded, content=found[0]).encode(), follow_symlinks=False)
            self._synced(parent)
        self._act(change, "unhidden", "copied in the image's new entries: %s" % shown)

    def _copy_in(self, src: bytes, rel: tuple[bytes, ...], dir_fd: int, name: bytes) -> None:
        """Copy the lower object `src` (a tree: one level at a time, each whole in the
        work dir before one rename puts it in place) to dir_fd/name."""
        st = os.lstat(src)
        tmp = self.upper.temp_name()
        try:
            self._build(src, st, rel, self.work, tmp)
            renameat2(self.work, tmp, dir_fd, name, RENAME_NOREPLACE)
        except BaseException:
            _discard(self.work, tmp)
            raise

    def _build(self, src: bytes, st, rel, dir_fd: int, name: bytes) -> None:
        extra = {self.markers.origin: self._origin_of(src, rel)}
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            fd = open_listable(dir_fd, name)
            try:
                for child in sorted(os.listdir(src)):
                    path = src + b"/" + child
                    self._build(path, os.lstat(path), rel + (child,), fd, child)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _new_file(dir_fd, name, copy_of=src, size=st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), name, dir_fd=dir_fd)
        else:
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dir_fd)
        copyup.copy_meta(st, proc_path(dir_fd, name), self.markers.is_private, src,
                         extra=extra)

    def _synced(self, dir_fd: int) -> None:
        """A change of names in dir_fd is on disk before the next is made."""
        fd = os.open(proc_path(dir_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fields(recorded: origin.Origin | None, mine: origin.Origin, lst
            ) -> tuple[SimpleNamespace, list[str]]:
    """The metadata of a new copy: each field changed here (against the origin) kept,
    the others the image's (`lst`); and the names of those kept."""
    kept = []
    if recorded is None:
        recorded = mine  # (no origin: nothing counts as changed here)

    def pick(field_name: str, mine_value, recorded_value, image_value):
        if mine_value != recorded_value:
            kept.append(field_name)
            return mine_value
        return image_value

    mode = pick("mode", mine.mode, recorded.mode, stat.S_IMODE(lst.st_mode))
    uid = pick("owner", mine.uid, recorded.uid, lst.st_uid)
    gid = pick("group", mine.gid, recorded.gid, lst.st_gid)
    if mine.xattrs != recorded.xattrs:
        kept.append("xattrs")
    # The mtime goes with the content: the image's (the caller sets it for a merge).
    return SimpleNamespace(st_mode=stat.S_IFMT(lst.st_mode) | mode, st_uid=uid, st_gid=gid,
                           st_atime_ns=lst.st_atime_ns, st_mtime_ns=lst.st_mtime_ns), kept


def kind_of(st) -> str:
    return origin.kind_of(st.st_mode).decode()


def _lstat(path: bytes | None):
    if path is None:
        return None
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _listxattr(path: bytes) -> list[bytes]:
    try:
        return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
    except OSError:
        return []


def _open_read(path: bytes):
    """A file open for reading (a lower file keeps its atime: the lower is never
    modified)."""
    return os.fdopen(open_noatime(path), "rb")


def _read(path: bytes) -> bytes:
    with _open_read(path) as f:
        return f.read(origin.BASE_LIMIT + 1)


def _new_file(dir_fd: int, name: bytes, *, copy_of: bytes | None = None, size: int = 0,
              data: bytes = b"") -> None:
    """A new file dir_fd/name (mode 0600, for copy_meta to finish) holding the `size`
    bytes of the file at `copy_of`, or else `data`; its data fsynced before any rename
    gives it a name."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        if copy_of is not None:
            with _open_read(copy_of) as src:
                copyup.copy_data(src.fileno(), fd, size)
        else:
            write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(work: int, name: bytes) -> None:
    try:
        remove_tree(work, name)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- entry points


def log_actions(mount: Mount, result: Result) -> None:
    """The actions, in the mount's write log (op `reconcile`)."""
    if not result.actions:
        return
    try:
        append_events(state_mod.log_path(mount.state, mount.mountpoint), mount.mountpoint,
                      "reconcile", [(a.path, a.action, a.detail, a.beside)
                                    for a in result.actions])
    except OSError as e:
        log.warning("write log: cannot record the reconcile: %s", e.strerror)


def at_mount(state: str, mountpoint: str, lower: str, overlay, lower_fd: int, work_fd: int,
             write_log: bool) -> Result | None:
    """Reconcile at a mount (the mount holds the upper layer's lock): the lower through
    the mount's own descriptor.  Failures are logged, the state stays (each file old or
    new), and None tells the mount to try again next time."""
    mount = Mount(state, mountpoint, lower, Live(os.getpid(), lower_fd, ""), overlay)
    try:
        r = Reconciler(mount, work_fd=work_fd)
        try:
            result = r.run()
        finally:
            r.close()
    except Exception as e:  # a mount (of /etc, at boot) goes on whatever went wrong here
        log.error("reconcile with the new image failed (the state is as it was, each file "
                  "old or new; the next mount tries again, or run `rofs reconcile %s`): %s",
                  quote(state), e, exc_info=not isinstance(e, (OSError, ToolError)))
        return None
    for a in result.actions:
        (log.warning if a.action in ("conflict", "hidden") else log.info)("reconcile: %s",
                                                                          a.line())
    log.warning("%s", result.summary())
    if write_log:
        log_actions(mount, result)
    return result


