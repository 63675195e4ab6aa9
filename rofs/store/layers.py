"""The two layers, reached only through file descriptors relative to their roots.

rofs is usually mounted over its own lower directory, so after the mount a path such
as "/etc/passwd" leads back into rofs.  Every access to a layer is therefore
fd-relative: each directory is opened one component at a time with
O_PATH|O_DIRECTORY|O_NOFOLLOW from its parent's descriptor.  That also means rofs never
follows a symlink in either layer (a symlink where a directory is expected gives
ENOTDIR), and that no absolute path is ever built, so depth is not limited by PATH_MAX.

Invariant for callers: a descriptor returned by `DirFdCache.get` stays valid until the
next `trim()`.  Only the ops adapter calls `trim()`, at the start of a request, so a
handler may use the fds it got until it awaits; it must not keep them across an await.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Hashable

from rofs._sys import get_inode_flags, open_noatime, proc_path

log = logging.getLogger(__name__)

DIR_OPEN_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirFdCache:
    """An LRU of open directory descriptors; eviction only happens in trim()."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._fds: OrderedDict[Hashable, int] = OrderedDict()

    def get(self, key: Hashable) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: Hashable, fd: int) -> None:
        old = self._fds.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self._fds[key] = fd

    def drop(self, key: Hashable) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def trim(self) -> None:
        while len(self._fds) > self.capacity:
            _, fd = self._fds.popitem(last=False)
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __len__(self) -> int:
        return len(self._fds)


def open_dir_fd(parent_fd: int, name: bytes) -> int:
    return os.open(name, DIR_OPEN_FLAGS, dir_fd=parent_fd)


def open_listable(parent_fd: int | None, name: bytes) -> int:
    """A readable descriptor of the directory parent_fd/name (for scandir), not
    following a symlink there (parent_fd None: `name` is a path)."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=parent_fd)


def reopen_listable(dir_fd: int) -> bytes:
    """The path that reopens directory descriptor dir_fd (an O_PATH one) for listing:
    its /proc magic link, which needs no search permission on the directory (opening
    "." through it would: a r-- directory could not be listed)."""
    return b"/proc/self/fd/%d" % dir_fd


def lstat_below(root_fd: int, path: tuple[bytes, ...]) -> os.stat_result | None:
    """lstat of root/path, walking one component at a time without following symlinks;
    None if it is not there."""
    fd = root_fd
    try:
        for name in path[:-1]:
            child = open_dir_fd(fd, name)
            if fd != root_fd:
                os.close(fd)
            fd = child
        if not path:
            return os.fstat(root_fd)
        return os.stat(path[-1], dir_fd=fd, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    finally:
        if fd != root_fd:
            os.close(fd)


SKIP = object()  # walk_sorted: do not walk into this entry

OPEN_LEVELS = 32  # descriptors a tree walk holds at most, however deep the tree


class Descent:
    """The chain of directories from a walk's top (level 0, the caller's descriptor) to
    where the walk is, holding at most OPEN_LEVELS descriptors whatever the depth: a
    user may make a tree deeper than any open-file limit.  A level whose descriptor was
    closed is opened again by name, from the top, when the walk comes back to it, and
    must still be the same directory (device and inode), else ESTALE: the tree was
    moved while it was walked.

    Open levels are always level 0 and one run at the bottom, [first_open, len)."""

    def __init__(self, top_fd: int) -> None:
        st = os.fstat(top_fd)
        self._fds: list[int | None] = [top_fd]
        self._names: list[bytes] = [b""]
        self._ids: list[tuple[int, int]] = [(st.st_dev, st.st_ino)]
        self._first_open = 1

    def __len__(self) -> int:
        return len(self._fds)

    def push(self, name: bytes) -> int:
        """Descend into the directory `name` of the bottom level; its descriptor."""
        fd = open_listable(self.fd(len(self._fds) - 1), name)
        st = os.fstat(fd)
        self._fds.append(fd)
        self._names.append(name)
        self._ids.append((st.st_dev, st.st_ino))
        if len(self._fds) - self._first_open > OPEN_LEVELS:
            os.close(self._fds[self._first_open])
            self._fds[self._first_open] = None
            self._first_open += 1
        return fd

    def pop(self) -> None:
        """Leave the bottom level (never level 0)."""
        fd = self._fds.pop()
        self._names.pop()
        self._ids.pop()
        if fd is not None:
            os.close(fd)
        self._first_open = min(self._first_open, len(self._fds))

    def fd(self, level: int) -> int:
        """The descriptor of `level` (negative: from the bottom), opened again if it
        was closed, with half the window of levels above it."""
        level %= len(self._fds)
        if level == 0 or level >= self._first_open:
            return self._fds[level]
        first = max(1, level - OPEN_LEVELS // 2 + 1)
        reopened: list[int] = []
        passing = None  # a level above the window, open only to reach the next one
        try:
            parent = self._fds[0]
            for i in range(1, self._first_open):
                child = open_listable(parent, self._names[i])
                if passing is not None:
                    os.close(passing)
                    passing = None
                if i >= first:
                    reopened.append(child)
                else:
                    passing = child
                st = os.fstat(child)
                if (st.st_dev, st.st_ino) != self._ids[i]:
                    raise OSError(errno.ESTALE, "a directory was moved while the tree was "
                                  "walked", os.fsdecode(b"/".join(self._names[1:i + 1])))
                parent = child
        except BaseException:
            for fd in reopened + ([] if passing is None else [passing]):
                os.close(fd)
            raise
        self._fds[first:self._first_open] = reopened
        self._first_open = first
        return self._fds[level]

    def close(self) -> None:
        """Close every descriptor this walk opened (level 0 stays the caller's)."""
        for i in range(1, len(self._fds)):
            if self._fds[i] is not None:
                os.close(self._fds[i])
                self._fds[i] = None
        self._first_open = len(self._fds)


def walk_sorted(top_fd: int, rel: tuple[bytes, ...], context, visit) -> None:
    """Visit every entry below the directory top_fd, depth first and in name order:
    visit(dir_fd, name, rel, context) returns SKIP, or the context to walk that entry (a
    directory) with; dir_fd is valid during the call, so visit may use
    proc_path(dir_fd, name), which stays short however deep the tree is.  Iterative,
    with at most OPEN_LEVELS descriptors (top_fd stays the caller's)."""
    def names(fd: int):
        return iter(sorted(os.fsencode(n) for n in os.listdir(fd)))

    levels = Descent(top_fd)
    stack = [(rel, context, names(top_fd))]
    try:
        while stack:
            rel, ctx, rest = stack[-1]
            name = next(rest, None)
            if name is None:
                stack.pop()
                if stack:
                    levels.pop()
                continue
            sub = visit(levels.fd(-1), name, rel + (name,), ctx)
            if sub is not SKIP:
                child = levels.push(name)
                stack.append((rel + (name,), sub, names(child)))
    finally:
        levels.close()


def visit_tree(dir_fd: int, name: bytes, visit) -> None:
    """visit(directory descriptor, name, lstat result) for dir_fd/name and every entry
    below it (walk_sorted's walk: iterative, with bounded descriptors)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    visit(dir_fd, name, st)
    if not stat.S_ISDIR(st.st_mode):
        return

    def each(fd: int, child: bytes, rel, context):
        st = os.stat(child, dir_fd=fd, follow_symlinks=False)
        visit(fd, child, st)
        return None if stat.S_ISDIR(st.st_mode) else SKIP

    top = open_listable(dir_fd, name)
    try:
        walk_sorted(top, (), None, each)
    finally:
        os.close(top)


def open_below(root_fd: int, path: tuple[bytes, ...]) -> int:
    """A new readable descriptor of the directory root/path, walked one component at a
    time without following symlinks (path () opens root itself again)."""
    fd = open_listable(root_fd, b".")
    for name in path:
        try:
            child = open_listable(fd, name)
        finally:
            os.close(fd)
        fd = child
    return fd


def remove_tree(dir_fd: int, name: bytes) -> None:
    """Remove `name` (a file or a whole directory tree) below dir_fd, fd-relative and
    iteratively: at most OPEN_LEVELS descriptors and each directory listed once, so a
    tree of any depth or width a user made goes in time linear in its size."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return

    levels = Descent(dir_fd)
    stack = []  # (name, its entries not yet removed), one per level below dir_fd

    def enter(child: bytes) -> None:
        with os.scandir(levels.push(child)) as entries:
            listed = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False))
                      for e in entries]
        stack.append((child, iter(listed)))

    try:
        enter(name)
        while stack:
            child, rest = stack[-1]
            entry = next(rest, None)
            if entry is None:
                stack.pop()
                levels.pop()
                os.rmdir(child, dir_fd=levels.fd(-1))
                continue
            ename, is_dir = entry
            if is_dir:
                enter(ename)
            else:
                os.unlink(ename, dir_fd=levels.fd(-1))
    finally:
        levels.close()


def remove_path(path: str | bytes) -> None:
    """remove_tree of a path (its parent opened, the last component removed)."""
    path = os.fsencode(path)
    parent = open_listable(None, os.path.dirname(path))
    try:
        remove_tree(parent, os.path.basename(path))
    finally:
        os.close(parent)


class LowerLayer:
    """The read-only layer.  Nothing here writes; paths are tuples of name components."""

    def __init__(self, root_fd: int, cache: DirFdCache) -> None:
        self.root_fd = root_fd
        self.dev = os.fstat(root_fd).st_dev
        self._cache = cache

    def dirfd(self, path: tuple[bytes, ...]) -> int:
        """Descriptor of the lower directory at `path`, opened component by component."""
        if not path:
            return self.root_fd
        fd = self._cache.get(("L", path))
        if fd is not None:
            return fd
        # Find the deepest cached ancestor, then walk down (iteratively: paths may be
        # thousands of components deep).
        depth = len(path) - 1
        parent = self.root_fd
        while depth > 0:
            cached = self._cache.get(("L", path[:depth]))
            if cached is not None:
                parent = cached
                break
            depth -= 1
        for i in range(depth, len(path)):
            parent = open_dir_fd(parent, path[i])
            self._cache.put(("L", path[: i + 1]), parent)
        return parent

    def stat(self, path: tuple[bytes, ...]) -> os.stat_result:
        if not path:
            return os.fstat(self.root_fd)
        return os.stat(path[-1], dir_fd=self.dirfd(path[:-1]), follow_symlinks=False)

    def try_stat(self, path: tuple[bytes, ...]) -> os.stat_result | None:
        try:
            return self.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open(self, path: tuple[bytes, ...], flags: int = os.O_RDONLY) -> int:
        """Open a lower object for reading, without updating its atime where allowed."""
        return open_noatime(path[-1], flags | os.O_NOFOLLOW, dir_fd=self.dirfd(path[:-1]))

    def open_dir(self, path: tuple[bytes, ...]) -> int:
        """A readable descriptor of the lower directory at `path` (for listing it)."""
        return open_noatime(reopen_listable(self.dirfd(path)), os.O_RDONLY | os.O_DIRECTORY)

    def readlink(self, path: tuple[bytes, ...]) -> bytes:
        return os.readlink(path[-1], dir_fd=self.dirfd(path[:-1]))

    def inode_flags(self, path: tuple[bytes, ...]) -> int:
        """The inode flags (chattr) of a lower regular file or directory; 0 if unknown."""
        try:
            fd = self.open(path, os.O_RDONLY | os.O_NONBLOCK) if path else self.open_dir(())
        except PermissionError:  # a daemon other than root, on a file it cannot read
            return 0
        try:
            return get_inode_flags(fd)
        finally:
            os.close(fd)

    def xattr_path(self, path: tuple[bytes, ...]) -> bytes:
        if not path:
            return proc_path(self.root_fd)
        return proc_path(self.dirfd(path[:-1]), path[-1])


class Markers:
    """The overlay markers rofs writes, in the kernel overlayfs format.

    `prefix` is "trusted.overlay." (root) or "user.overlay." (overlayfs `userxattr`).
    Every xattr under either name space is reserved to the overlay: hidden from and
    refused through the mount, so no user can forge a whiteout, opaque dir or redirect,
    whichever way the state is mounted later (the kernel reads user.overlay.* with
    `userxattr`).
    """

    TRUSTED = b"trusted.overlay."
    USER = b"user.overlay."
    RESERVED = (TRUSTED, USER)

    def __init__(self, prefix: bytes = TRUSTED) -> None:
        self.prefix = prefix
        # The kernel follows redirects only from trusted.overlay.* (with `userxattr` it
        # forces redirect_dir=nofollow: anyone could have written them), so a state with
        # user markers gets none: moving a lower directory is EXDEV there, as in the
        # kernel, and `mv` copies.
        self.redirects = prefix == self.TRUSTED
        self.opaque = prefix + b"opaque"
        self.redirect = prefix + b"redirect"
        # rofs's own: the inode number rofs showed for a copied-up object, so that it
        # stays the same across copy-up and remount.  The kernel ignores unknown names
        # in its namespace and hides them like the others.
        self.ino = prefix + b"rofs.ino"
        # On a copied-up lower hard link while some of its lower names are not yet in
        # the upper layer: how many (they count in st_nlink; see Overlay._materialize).
        self.nlink = prefix + b"rofs.nlink"
        # The immutable and append-only flags of a copied-up lower object ("i", "a"):
        # kept here, not on the upper inode, so that the overlay can still link, move and
        # remove its own copy.  The kernel reads and writes it alike.
        self.protattr = prefix + b"protattr"
        # What a copied-up object was in the lower layer (rofs.origin), so that an image
        # update can tell a copy changed here from a stale one.
        self.origin = prefix + b"rofs.origin"

    def is_private(self, name: bytes) -> bool:
        return name.startswith(self.RESERVED)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def getxattr_or_none(path: bytes, name: bytes) -> bytes | None:
    """A marker's value, None if the object has none.  A marker that cannot be read is
    an error (EIO, logged), never "absent": an opaque or redirect marker taken for
    absent would show lower content the state hides."""
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        log.error("cannot read %s of %s: %s", name.decode(errors="replace"),
                  os.fsdecode(path), e.strerror)
        raise OSError(errno.EIO, "%s (marker %s)" % (e.strerror, name.decode(
            errors="replace"))) from None


class UpperLayer:
    """The writable layer and its work directory (same filesystem, for atomic renames)."""

    def __init__(self, root_fd: int, work_fd: int, markers: Markers, tag: str = "U") -> None:
        # "U": the persistent upper layer; "S": the scratch layer (rofs.overlay).  The
        # tag names the layer in node backings and directory descriptor cache keys.
        self.tag = tag
        self.root_fd = root_fd
        self.index_fd: int | None = None  # its hard-link index (see docs/state-format.md)
        self.work_fd = work_fd
        self.dev = os.fstat(root_fd).st_dev
        self.markers = markers
        self._names = itertools.count()
        self._tag = "%d" % os.getpid()

    def temp_name(self) -> bytes:
        """A fresh name in the work dir.  Leftovers (a crash) are removed at mount."""
        return ("#rofs.%s.%d" % (self._tag, next(self._names))).encode()

    def work_path(self, name: bytes) -> bytes:
        return proc_path(self.work_fd, name)

    def try_stat(self, dir_fd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def make_whiteout(self, dir_fd: int, name: bytes) -> None:
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)

    def set_marker(self, dir_fd: int, name: bytes, marker: bytes, value: bytes) -> None:
        os.setxattr(proc_path(dir_fd, name), marker, value, follow_symlinks=False)

    def remove_marker(self, dir_fd: int, name: bytes, marker: bytes) -> None:
        try:
            os.removexattr(proc_path(dir_fd, name), marker, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise

    def get_marker(self, dir_fd: int, name: bytes, marker: bytes) -> bytes | None:
        return getxattr_or_none(proc_path(dir_fd, name), marker)

    def remove_tree(self, dir_fd: int, name: bytes) -> None:
        """Remove `name` (a file or a whole directory tree) below dir_fd, fd-relative."""
        remove_tree(dir_fd, name)
