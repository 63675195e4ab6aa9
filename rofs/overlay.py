"""The merged view: kernel-overlayfs semantics over a lower and an upper directory.

This module knows nothing of the FUSE protocol; it works on two directory descriptors
and can be driven directly in tests (`rofs.fuse.run_inline` runs its coroutines).

Concurrency.  All methods run on one thread (the FUSE loop's, rofs.fuse.session).
Synchronous methods and the synchronous stretches of the async ones are atomic with
respect to every other request: nothing else runs until the next `await`.  The only
awaits are the slow parts of a copy-up (data copy, fsync) and fsync requests, which run
on worker threads (`offload`).  So:
- after an await, everything resolved before it (nodes, names, descriptors) is checked
  again before it is used;
- a copy-up of one node happens once: concurrent requests wait for the one in flight
  (`_copying`), then see `node.upper`.

Atomicity on disk.  Every change to the upper layer that replaces or creates a visible
name is a single rename (renameat2 with NOREPLACE/EXCHANGE/WHITEOUT) of an object that
was completely prepared in the work dir, so a crash leaves the old view or the new one.
Markers that must accompany a move (redirect, opaque) are set before the move and are
chosen so that they do not change what the old location shows.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import functools
import inspect
import itertools
import logging
import os
import resource
import stat
from collections.abc import Iterator

from rofs import acl, attic, copyup, scratch
from rofs._sys import (
    FS_APPEND_FL,
    FS_IMMUTABLE_FL,
    FS_NOATIME_FL,
    FS_NODUMP_FL,
    FS_SYNC_FL,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    add_inode_flags,
    fallocate,
    get_inode_flags,
    malloc_trim,
    proc_path,
    renameat2,
    set_inode_flags,
)
from rofs.fuse import Event, offload
from rofs.inodes import NO_FDS, ROOT_INO, Node, NodeTable
from rofs.layers import (
    DirFdCache,
    LowerLayer,
    Markers,
    UpperLayer,
    getxattr_or_none,
    is_whiteout,
    open_dir_fd,
    open_listable,
    reopen_listable,
)
from rofs.policy import Class, Policy

log = logging.getLogger(__name__)

PROTECTION_FLAGS = FS_IMMUTABLE_FL | FS_APPEND_FL
# Inode flags a copy-up carries to the upper inode itself, as kernel overlayfs does.
COPIED_FLAGS = FS_SYNC_FL | FS_NODUMP_FL | FS_NOATIME_FL

NAME_MAX = 255
# Names the listings of users other than root may hold at once (about 100 bytes each):
# past it, a readdir that needs a new listing fails with ENOMEM for them.  Root's never
# does.  $ROFS_LISTING_BUDGET overrides it (tests use a small one).
LISTING_BUDGET = int(os.environ.get("ROFS_LISTING_BUDGET") or 2_000_000)
TRIM_AFTER_NAMES = 10_000  # releasing a listing this big returns memory to the system
# Copy-ups of files up to this size run inline: a thread hop costs more than the copy.
INLINE_COPY = 1 << 20
IDLE_READERS = 128  # see Overlay._idle
OPEN_KEEP_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC |
                   os.O_NONBLOCK)


def _err(code: int, *args) -> OSError:
    return OSError(code, os.strerror(code), *args)


class Attr:
    """The attributes of a node as the merged view shows them."""

    __slots__ = ("ino", "generation", "mode", "nlink", "uid", "gid", "rdev", "size",
                 "blocks", "blksize", "atime_ns", "mtime_ns", "ctime_ns")

    def __init__(self, st: os.stat_result, ino: int, nlink: int, generation: int = 0) -> None:
        self.ino = ino
        self.generation = generation
        self.mode = st.st_mode
        self.nlink = nlink
        self.uid = st.st_uid
        self.gid = st.st_gid
        self.rdev = st.st_rdev
        self.size = st.st_size
        self.blocks = st.st_blocks
        self.blksize = st.st_blksize
        self.atime_ns = st.st_atime_ns
        self.mtime_ns = st.st_mtime_ns
        self.ctime_ns = st.st_ctime_ns


class OpenFile:
    """One daemon descriptor of a node's data, used by one or more file handles: all
    the read-only handles of a node share one (reads give their offset), a writer has
    its own.  It counts against the uid that opened it first."""

    __slots__ = ("fd", "on_lower", "users", "shared", "uid")

    def __init__(self, fd: int, on_lower: bool, shared: bool, uid: int) -> None:
        self.fd = fd
        self.on_lower = on_lower
        self.users = 0
        self.shared = shared
        self.uid = uid


class FileHandle:
    __slots__ = ("fh", "file", "node", "flags", "pid", "uid")

    def __init__(self, fh: int, file: OpenFile, node: Node, flags: int, pid: int,
                 uid: int) -> None:
        self.fh = fh  # what the kernel knows the open file by
        self.file = file
        self.node = node
        self.flags = flags
        self.pid = pid  # the opener: write() itself carries no caller
        self.uid = uid

    @property
    def fd(self) -> int:
        return self.file.fd

    @property
    def on_lower(self) -> bool:
        return self.file.on_lower


class Listing:
    """A directory's names as one readdir pass sees them, shared by every handle that
    starts a pass while the namespace is unchanged (Overlay.generation).  It counts
    against the uid that took it."""

    __slots__ = ("names", "generation", "users", "uid")

    def __init__(self, names: tuple[bytes, ...], generation: int, uid: int) -> None:
        self.names = names
        self.generation = generation
        self.users = 0
        self.uid = uid


class DirHandle:
    __slots__ = ("node", "listing", "served", "uid")

    def __init__(self, node: Node, uid: int = 0) -> None:
        self.node = node
        self.listing: Listing | None = None
        self.served = False
        self.uid = uid  # who opened it: root's listings are never refused


def _changes_names(method):
    """Marks an Overlay method that adds, removes or moves names: listings taken before
    it ends are not shared with passes that start after it.  (An async one may await a
    copy-up before it changes anything, and a listing taken meanwhile would miss the
    change: the generation moves when it ends too.)"""
    if inspect.iscoroutinefunction(method):
        async def wrapper(self, *args, **kwargs):
            self.generation += 1
            try:
                return await method(self, *args, **kwargs)
            finally:
                self.generation += 1
    else:
        def wrapper(self, *args, **kwargs):
            self.generation += 1
            return method(self, *args, **kwargs)
    return functools.wraps(method)(wrapper)


class Overlay:
    """The merged view of `lower_fd` (never written) and `upper_fd` (all changes)."""

    def __init__(self, lower_fd: int, upper_fd: int, work_fd: int,
                 markers: Markers | None = None, *, index_fd: int | None = None,
                 fd_cache_size: int = 4096) -> None:
        # Descriptors: the directory cache gets a quarter of the limit (at most
        # fd_cache_size), some stay for everything else, and open files get the rest;
        # of those, users other than root may hold all but a reserve, so that however
        # many files they keep open, root can still open, list and change /etc.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fds = DirFdCache(max(16, min(fd_cache_size, limit // 4)))
        self.file_limit = max(32, limit - self.fds.capacity - 64 - limit // 32)
        self.user_file_limit = self.file_limit - max(16, self.file_limit // 8)
        # ... and one user at most a quarter of what users may hold, so that one user
        # holding files open does not shut the others out either.
        self.uid_file_limit = max(16, self.user_file_limit // 4)
        self._fds_by_uid: collections.Counter = collections.Counter()
        self.lower = LowerLayer(lower_fd, self.fds)
        self.upper = UpperLayer(upper_fd, work_fd, markers or Markers())
        self.markers = self.upper.markers
        self.upper.index_fd = index_fd
        self.table = NodeTable(self.lower.dev, self.upper.dev)
        root_st = os.fstat(upper_fd)
        self.root = Node(ROOT_INO, stat.S_IFDIR, upper=True, lower=(),
                         backing=("U", root_st.st_dev, root_st.st_ino))
        self.root.lookups = 1
        self.table.add_root(self.root)
        self._copying: dict[int, Event] = {}
        self.failures_after_commit = 0  # see _after_commit
        self.files: dict[int, FileHandle] = {}  # fh -> handle
        self._open_files: dict[int, OpenFile] = {}  # fd -> its descriptor's record
        self._readers: dict[int, OpenFile] = {}  # id(node) -> its shared read-only one
        # Shared read-only descriptors of lower files whose last handle was released,
        # kept for the next open (an open+read+close of /etc/passwd then costs no
        # open(2) or close(2) here): least recently used first, at most IDLE_READERS.
        # They count against nobody's share, and go first when descriptors run short.
        self._idle: collections.OrderedDict[int, tuple[OpenFile, Node]] = \
            collections.OrderedDict()
        self._fhs = itertools.count(1)
        self.dirs: dict[int, DirHandle] = {}
        # Listings (readdir snapshots): shared per directory while nothing changed names
        # (generation), and bounded in names held for users other than root.
        self.generation = 0
        self._listings: dict[int, Listing] = {}  # directory inode -> its newest
        self.listed_names = 0  # names held by the listings of open handles
        self._listed_by_uid: collections.Counter = collections.Counter()
        self.listing_budget = LISTING_BUDGET
        self._dir_ids = itertools.count(1)
        # Per-path policy: `policy` for the read-only class (None when nothing is
        # read-only); `classes` and `scratch_layer` when scratch paths have a layer of
        # their own (None: every change goes to the persistent upper layer).
        self.policy: Policy | None = None
        self.classes: Policy | None = None
        self.scratch_layer: UpperLayer | None = None

    def set_policy(self, policy: Policy, scratch_layer: UpperLayer | None = None) -> None:
        self.policy = policy if policy.has_read_only else None
        if scratch_layer is not None and policy.has_scratch:
            self.classes = policy
            self.scratch_layer = scratch_layer

    @property
    def index_fd(self) -> int | None:
        """The persistent layer's hard-link index."""
        return self.upper.index_fd

    def _lay(self, node: Node) -> UpperLayer:
        """The upper layer a node's changes go to."""
        return node.layer or self.upper

    def layer_for(self, parent: Node, name: bytes) -> UpperLayer:
        """The upper layer for the entry `name` of `parent`, by its policy class."""
        if self.scratch_layer is None:
            return self.upper
        path = self.path_of(parent)
        if path is None:
            return self._lay(parent)
        return self._class_layer(path + (name,))

    def _class_layer(self, path: tuple[bytes, ...]) -> UpperLayer:
        if self.classes.classify(path) is Class.SCRATCH:
            return self.scratch_layer
        return self.upper

    def _layers(self) -> tuple[UpperLayer, ...]:
        return (self.upper,) if self.scratch_layer is None else (self.upper,
                                                                 self.scratch_layer)

    def _drop_dirfds(self, node: Node) -> None:
        for layer in self._layers():
            self.fds.drop((layer.tag, node.ino))

    def path_of(self, node: Node) -> tuple[bytes, ...] | None:
        """The merged-view path of a node (its first name), None if it has none."""
        names = []
        while node is not self.root:
            if not node.links:
                return None
            node, name = node.links[0]
            names.append(name)
        return tuple(reversed(names))

    def check_writable(self, node: Node, name: bytes | None = None) -> None:
        """EROFS for a change to a path of the read-only class (node, or node/name)."""
        if self.policy is None:
            return
        path = self.path_of(node)
        if path is None:
            return
        if name is not None:
            path += (name,)
        if self.policy.classify(path) is Class.READ_ONLY:
            raise _err(errno.EROFS)

    def check_movable(self, parent: Node, name: bytes) -> None:
        """EROFS for renaming a directory that holds read-only paths (they would move)."""
        if self.policy is None:
            return
        path = self.path_of(parent)
        if path is not None and any(r.cls is Class.READ_ONLY
                                    for r in self.policy.rules_below(path + (name,))):
            raise _err(errno.EROFS)

    def protection(self, node: Node) -> int:
        """FS_IMMUTABLE_FL | FS_APPEND_FL of a regular file or directory, which rofs
        enforces as the kernel does for local files (the kernel cannot: FUSE does not
        carry inode flags): the lower object's own flags, or for an upper copy its
        protattr marker (written at copy-up, the kernel overlayfs format)."""
        if node.prot < 0:
            prot = 0
            if node.upper and (node.is_dir or stat.S_ISREG(node.mode)):
                target, follow = self._upper_target(node)
                try:
                    value = os.getxattr(target, self.markers.protattr, follow_symlinks=follow)
                except OSError as e:
                    if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                        raise
                    value = b""
                prot = (FS_APPEND_FL if b"a" in value else 0) | \
                    (FS_IMMUTABLE_FL if b"i" in value else 0)
            elif node.lower is not None and (node.is_dir or stat.S_ISREG(node.mode)):
                prot = self.lower.inode_flags(node.lower) & PROTECTION_FLAGS
            node.prot = prot
        return node.prot

    def inode_flags(self, node: Node) -> int:
        """FS_IOC_GETFLAGS of the merged view: the lower object's flags, or the upper
        copy's with its protattr marker's immutable/append-only."""
        if not (node.is_dir or stat.S_ISREG(node.mode)):
            raise _err(errno.ENOTTY)
        if not node.upper:
            return self.lower.inode_flags(node.lower) if node.lower is not None else 0
        fd = self._open_for_flags(node)
        try:
            return get_inode_flags(fd) & ~PROTECTION_FLAGS | self.protection(node)
        finally:
            os.close(fd)

    async def set_inode_flags(self, node: Node, flags: int, uid: int) -> None:
        """FS_IOC_SETFLAGS (chattr): the node is copied up; immutable and append-only go
        to its protattr marker (the upper inode never carries them: see Markers), the
        other flags to the upper inode.  Only the owner or root may, and only root may
        change immutable/append-only (root stands for CAP_LINUX_IMMUTABLE)."""
        if not (node.is_dir or stat.S_ISREG(node.mode)):
            raise _err(errno.ENOTTY)
        self.check_writable(node)
        if uid != 0 and uid != self._stat(node).st_uid:
            raise _err(errno.EPERM)
        if uid != 0 and (flags ^ self.protection(node)) & PROTECTION_FLAGS:
            raise _err(errno.EPERM)
        await self.copy_up(node)
        fd = self._open_for_flags(node)
        try:
            set_inode_flags(fd, flags & ~PROTECTION_FLAGS)
            marker = self._protattr(flags)
            if marker:
                os.setxattr(fd, self.markers.protattr, marker[self.markers.protattr])
            else:
                try:
                    os.removexattr(fd, self.markers.protattr)
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        raise
        finally:
            os.close(fd)
        node.prot = flags & PROTECTION_FLAGS

    def _open_for_flags(self, node: Node) -> int:
        """A descriptor of the upper copy for the flag ioctls (which O_PATH cannot do)."""
        target, follow = self._upper_target(node)
        if isinstance(target, int):
            target = b"/proc/self/fd/%d" % target
        # follow: a /proc magic link to the object itself; else a name not to follow.
        return os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC |
                       (0 if follow else os.O_NOFOLLOW))

    def check_unprotected(self, *nodes: Node | None, appending: bool = False) -> None:
        """EPERM for a change to an immutable node, or to an append-only one unless the
        change only adds (`appending`: a write with O_APPEND, a new entry)."""
        for node in nodes:
            if node is None:
                continue
            prot = self.protection(node)
            if prot & FS_IMMUTABLE_FL or (prot & FS_APPEND_FL and not appending):
                raise _err(errno.EPERM)

    def stats(self) -> dict[str, int]:
        """Sizes of the daemon's tables (for `rofs status` and leak hunting)."""
        return {"nodes": len(self.table.nodes), "dentries": len(self.table.dentries),
                "dynamic_inos": len(self.table._dynamic), "open_files": len(self.files),
                "file_fds": len(self._open_files) - len(self._idle),
                "idle_fds": len(self._idle),
                "open_dirs": len(self.dirs), "listed_names": self.listed_names,
                "dir_fds": len(self.fds),
                "copy_ups": len(self._copying),
                "failures_after_commit": self.failures_after_commit,
                "kept_deleted": sum(1 for n in self.table.nodes.values() if n.keep_fd >= 0)}

    # ------------------------------------------------------------------ nodes

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise _err(errno.ESTALE)
        return node

    def upper_dirfd(self, node: Node, layer: UpperLayer | None = None, *,
                    create: bool = True) -> int | None:
        """Descriptor of directory `node` in an upper layer (default: its own).

        With `create`, what is missing on the way is made: a directory whose own layer
        this is gets copied up; in the other layer, a plain directory (a "mirror") is
        made to hold entries of that layer's class.  Without `create`, None when the
        directory is not in that layer.
        """
        if layer is None:
            layer = self._lay(node)
        if node is self.root:
            return layer.root_fd
        tag = layer.tag
        fd = self.fds.get((tag, node.ino))
        if fd is not None:
            return fd
        chain = []
        current = node
        while True:
            chain.append(current)
            parent = current.parent()
            if parent is None:
                raise _err(errno.ENOENT)
            if parent is self.root:
                fd = layer.root_fd
                break
            fd = self.fds.get((tag, parent.ino))
            if fd is not None:
                break
            current = parent
        for current in reversed(chain):
            name = current.links[0][1]
            try:
                fd = open_dir_fd(fd, name)
            except OSError as e:
                # Not there, or (in the other layer) not a directory: no mirror.
                if not create and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                if e.errno != errno.ENOENT:
                    raise
                if self._lay(current) is layer:
                    if current.upper:
                        raise
                    self._copy_up_dir(current)
                else:
                    self._make_mirror(fd, name, current)
                fd = open_dir_fd(fd, name)
            self.fds.put((tag, current.ino), fd)
        return fd

    def _make_mirror(self, parent_fd: int, name: bytes, node: Node) -> None:
        """A plain directory with node's owner and mode, in a layer that is not node's
        own, to hold entries of that layer's class.  Never merged or shown by itself."""
        st = self._stat(node)
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        copyup.chown(name, st.st_uid, st.st_gid, dir_fd=parent_fd, follow_symlinks=False)
        os.chmod(proc_path(parent_fd, name), stat.S_IMODE(st.st_mode))

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """The node `name` in `parent`, or None.  Does not take a kernel reference."""
        node = self.table.dentries.get((parent.ino, name))
        if node is not None:
            return node
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent() or self.root
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        return self._resolve(parent, name)

    def _resolve(self, parent: Node, name: bytes) -> Node | None:
        layer = self.layer_for(parent, name)
        if layer is self._lay(parent):
            up = self.upper_dirfd(parent) if parent.upper else None
        else:
            up = self.upper_dirfd(parent, layer, create=False)
        if up is not None:
            st = layer.try_stat(up, name)
            if st is not None:
                if is_whiteout(st):
                    return None
                path = proc_path(up, name)
                recorded, key = _parse_ino(getxattr_or_none(path, self.markers.ino))
                lower = self._merged_lower(parent, name, path) if stat.S_ISDIR(
                    st.st_mode) else None
                node = self.table.find_or_add(
                    parent, name, st.st_mode, upper=True, lower=lower,
                    backing=(layer.tag, st.st_dev, st.st_ino), recorded=recorded)
                node.layer = None if layer is self.upper else layer
                if key is not None:
                    self._load_index(node, key, st, layer)
                return node
        if parent.lower is None:
            return None
        try:
            st = os.stat(name, dir_fd=self.lower.dirfd(parent.lower), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        index = layer.index_fd
        if st.st_nlink > 1 and index is not None and not stat.S_ISDIR(st.st_mode):
            key = _index_key(st)
            if layer.try_stat(index, key) is not None:
                try:
                    self._materialize(parent, name, key, layer)
                except OSError as e:
                    # Still reachable, with its lower content, under its own number.
                    log.warning("cannot link %r to its copied-up hard link: %s", name, e)
                else:
                    return self._resolve(parent, name)
        node = self.table.find_or_add(parent, name, st.st_mode, upper=False,
                                      lower=parent.lower + (name,),
                                      backing=("L", st.st_dev, st.st_ino))
        if not node.upper:
            node.layer = None if layer is self.upper else layer
        return node

    def _merged_lower(self, parent: Node, name: bytes,
                      upper_path: bytes) -> tuple[bytes, ...] | None:
        """The lower directory an upper directory merges with, following the markers."""
        if getxattr_or_none(upper_path, self.markers.opaque) == b"y":
            return None
        redirect = getxattr_or_none(upper_path, self.markers.redirect)
        if redirect is not None:
            if redirect.startswith(b"/"):
                path = tuple(c for c in redirect.split(b"/") if c)
            elif parent.lower is not None:
                path = parent.lower + (redirect,)
            else:
                return None
        elif parent.lower is not None:
            path = parent.lower + (name,)
        else:
            return None
        st = self.lower.try_stat(path)
        return path if st is not None and stat.S_ISDIR(st.st_mode) else None

    def _load_index(self, node: Node, key: bytes, st: os.stat_result,
                    layer: UpperLayer) -> None:
        """An upper entry recorded as a copied-up lower hard link: is its index entry
        (still) the same inode?  Then its lower names not yet in the upper count too."""
        if layer.index_fd is None:
            return
        entry = layer.try_stat(layer.index_fd, key)
        if entry is None or entry.st_ino != st.st_ino:
            node.index_key = None
            return
        node.index_key = key
        node.nlink_delta = _parse_int(getxattr_or_none(proc_path(layer.index_fd, key),
                                                       self.markers.nlink))

    def _materialize(self, parent: Node, name: bytes, key: bytes, layer: UpperLayer) -> None:
        """A lower name of a copied-up hard link, met for the first time: link the upper
        copy (kept in the index) under this name, so it stays one inode.  When no lower
        name is left outside the upper layer, the index entry is no longer needed."""
        index = layer.index_fd
        os.link(key, name, src_dir_fd=index, dst_dir_fd=self.upper_dirfd(parent, layer),
                follow_symlinks=False)
        path = proc_path(index, key)
        ino = _parse_ino(getxattr_or_none(path, self.markers.ino))[0]
        remaining = _parse_int(getxattr_or_none(path, self.markers.nlink)) - 1
        if remaining > 0:
            os.setxattr(path, self.markers.nlink, b"%d" % remaining, follow_symlinks=False)
        else:
            os.removexattr(path, self.markers.nlink, follow_symlinks=False)
            os.unlink(key, dir_fd=index)
        node = self.table.get(ino or 0)
        if node is not None and node.index_key == key:
            node.nlink_delta = max(remaining, 0)
            if remaining <= 0:
                node.index_key = None

    def remember(self, node: Node, count: int = 1) -> None:
        """The kernel took `count` references to node (lookup, create, readdirplus)."""
        node.lookups += count

    def forget(self, ino: int, count: int) -> None:
        node = self.table.get(ino)
        if node is None or node is self.root:
            return
        node.lookups = max(0, node.lookups - count)
        self.table.maybe_drop(node)

    def trim(self) -> None:
        """After a batch of forgets: hand memory back to the system when the node table
        shrank a lot (the freed tables and nodes would otherwise stay in the heap)."""
        if self.table.shrink():
            malloc_trim()

    # ------------------------------------------------------------- attributes

    def _stat(self, node: Node) -> os.stat_result:
        if node is self.root:
            return os.fstat(self.upper.root_fd)
        if not node.links and node.keep_fd >= 0:
            return os.fstat(node.keep_fd)
        if node.upper:
            if node.links:
                parent, name = node.links[0]
                return os.stat(name, dir_fd=self.upper_dirfd(parent, self._lay(node)),
                               follow_symlinks=False)
            if node.open_fds:
                return os.fstat(next(iter(node.open_fds)))
            raise _err(errno.ENOENT)
        if node.lower is not None:
            return self.lower.stat(node.lower)
        raise _err(errno.ENOENT)

    def getattr(self, node: Node) -> Attr:
        st = self._stat(node)
        nlink = st.st_nlink
        if node.is_dir:
            if node.upper and node.lower is not None:
                nlink = 1  # like overlayfs: counting subdirs of a merge is not worth it
        elif not node.links:
            nlink = 0
        elif node.index_key is not None:
            # the index holds one link; lower names not yet linked in the upper count
            nlink = max(1, nlink - 1 + node.nlink_delta)
        return Attr(st, node.ino, nlink, node.generation)

    def readlink(self, node: Node) -> bytes:
        if not stat.S_ISLNK(node.mode):
            raise _err(errno.EINVAL)
        if node.target is None:
            if node.upper:
                if not node.links:
                    raise _err(errno.ENOENT)
                parent, name = node.links[0]
                node.target = os.readlink(name, dir_fd=self.upper_dirfd(parent,
                                                                         self._lay(node)))
            else:
                node.target = self.lower.readlink(node.lower)
        return node.target

    def statfs(self) -> os.statvfs_result:
        # Like overlayfs: the upper layer's filesystem is where new data goes.
        return os.statvfs(self.upper.root_fd)

    async def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      fh: int | None = None, times_now: bool = False) -> Attr:
        self.check_writable(node)
        if any(v is not None for v in (mode, uid, gid, size)):
            self.check_unprotected(node)
        elif atime_ns is not None or mtime_ns is not None:
            # An append-only object's times may be set to now (touch), not to a given
            # time (touch -d), as the kernel has it.
            self.check_unprotected(node, appending=times_now)
        if any(v is not None for v in (mode, uid, gid, size, atime_ns, mtime_ns)):
            await self.copy_up(node, data_limit=size)
            target, follow = self._upper_target(node, fh)
            if size is not None:
                if node.is_dir:
                    raise _err(errno.EISDIR)
                os.truncate(target, size)
            if uid is not None or gid is not None:
                os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid,
                         follow_symlinks=follow)
            if mode is not None and not stat.S_ISLNK(node.mode):
                os.chmod(target, stat.S_IMODE(mode))
            if atime_ns is not None or mtime_ns is not None:
                if atime_ns is None or mtime_ns is None:
                    st = self._stat(node)
                    atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                    mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
                os.utime(target, ns=(atime_ns, mtime_ns), follow_symlinks=follow)
        return self.getattr(node)

    def _upper_target(self, node: Node, fh: int | None = None) -> tuple[bytes | int, bool]:
        """How to reach an upper node for chmod/chown/xattrs: (path, False) or (fd, True)."""
        handle = self.files.get(fh) if fh is not None else None
        if handle is not None and handle.node is node and not handle.on_lower:
            return handle.fd, True
        if node is self.root:
            return proc_path(self.upper.root_fd), True
        if node.links:
            parent, name = node.links[0]
            return proc_path(self.upper_dirfd(parent, self._lay(node)), name), False
        if node.open_fds:
            return next(iter(node.open_fds)), True
        if node.keep_fd >= 0:
            return b"/proc/self/fd/%d" % node.keep_fd, True
        raise _err(errno.ENOENT)

    def _any_target(self, node: Node) -> tuple[bytes | int, bool]:
        if node.upper or node.keep_fd >= 0:
            return self._upper_target(node)
        return self.lower.xattr_path(node.lower), False

    # ----------------------------------------------------------------- xattrs

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if self.markers.is_private(name):
            raise _err(errno.ENOTSUP)
        target, follow = self._any_target(node)
        try:
            return os.getxattr(target, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENOTSUP and name in acl.NAMES:
                # A lower filesystem without ACLs: none set.  (EOPNOTSUPP would fail
                # every permission check the kernel makes.)
                raise _err(errno.ENODATA) from None
            raise

    def listxattr(self, node: Node) -> list[bytes]:
        target, follow = self._any_target(node)
        names = [os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow)]
        return [n for n in names if not self.markers.is_private(n)]

    async def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0) -> None:
        self.check_writable(node)
        self.check_unprotected(node)
        if self.markers.is_private(name):
            raise _err(errno.ENOTSUP)
        await self.copy_up(node)
        target, follow = self._upper_target(node)
        os.setxattr(target, name, value, flags, follow_symlinks=follow)

    async def removexattr(self, node: Node, name: bytes) -> None:
        self.check_writable(node)
        self.check_unprotected(node)
        if self.markers.is_private(name):
            raise _err(errno.ENOTSUP)
        if not node.upper:
            self.getxattr(node, name)  # ENODATA before any copy-up
        await self.copy_up(node)
        target, follow = self._upper_target(node)
        os.removexattr(target, name, follow_symlinks=follow)

    # ---------------------------------------------------------------- copy-up

    async def copy_up(self, node: Node, *, data_limit: int | None = None) -> None:
        """Give `node` (and its parents) an upper copy, once, atomically.

        `data_limit` bounds the bytes copied (a truncate or O_TRUNC needs fewer or none).
        """
        while not node.upper:
            if node.is_dir:
                self._ensure_dir_upper(node)
                return
            pending = self._copying.get(node.ino)
            if pending is not None:
                await pending.wait()
                continue
            if not node.links:
                raise _err(errno.ENOENT)
            done = Event()
            self._copying[node.ino] = done
            try:
                await self._copy_up_file(node, data_limit)
            finally:
                del self._copying[node.ino]
                done.set()

    def _ensure_dir_upper(self, node: Node) -> None:
        """Copy up directory `node` (and what it needs above it) in its own layer."""
        if not node.upper:
            self.upper_dirfd(node)

    def _copy_up_dir(self, node: Node) -> None:
        parent, name = node.links[0]
        layer = self._lay(node)
        st = self.lower.stat(node.lower)
        work = layer.work_fd
        tmp = layer.temp_name()
        flags = self._lower_flags(node)
        os.mkdir(tmp, 0o700, dir_fd=work)
        try:
            copyup.copy_meta(st, layer.work_path(tmp), self.markers.is_private,
                             self.lower.xattr_path(node.lower),
                             extra={self.markers.ino: b"%d" % node.ino,
                                    **self._protattr(flags)})
            if flags & COPIED_FLAGS:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work)
                try:
                    add_inode_flags(fd, flags & COPIED_FLAGS)
                finally:
                    os.close(fd)
            new = os.stat(tmp, dir_fd=work, follow_symlinks=False)
            renameat2(work, tmp, self.upper_dirfd(parent, layer), name, RENAME_NOREPLACE)
        except BaseException:
            self._discard(tmp, layer)
            raise
        node.upper = True
        self.table.rebind(node, (layer.tag, new.st_dev, new.st_ino))

    def _lower_flags(self, node: Node) -> int:
        """The lower inode flags of a regular file or directory about to be copied up
        (its protection is known from then on)."""
        flags = self.lower.inode_flags(node.lower)
        node.prot = flags & PROTECTION_FLAGS
        return flags

    def _protattr(self, flags: int) -> dict[bytes, bytes]:
        """The protattr marker of a copy-up, if the lower object is protected."""
        value = (b"a" if flags & FS_APPEND_FL else b"") + \
            (b"i" if flags & FS_IMMUTABLE_FL else b"")
        return {self.markers.protattr: value} if value else {}

    async def _copy_up_file(self, node: Node, data_limit: int | None) -> None:
        st = self.lower.stat(node.lower)
        layer = self._lay(node)
        work = layer.work_fd
        tmp = layer.temp_name()
        # A lower hard link also goes to the index, so that its lower names not known yet
        # find this copy when they are looked up (like overlayfs index=on).
        index = layer.index_fd
        key = _index_key(st) if st.st_nlink > 1 and index is not None else None
        extra = {self.markers.ino: b"%d %s" % (node.ino, key) if key else b"%d" % node.ino}
        indexed = False
        try:
            if stat.S_ISREG(st.st_mode):
                flags = self._lower_flags(node)
                extra.update(self._protattr(flags))
                await self._copy_regular(node, st, tmp, data_limit, extra, layer,
                                         flags & COPIED_FLAGS)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(self.lower.readlink(node.lower), tmp, dir_fd=work)
                copyup.copy_meta(st, layer.work_path(tmp), self.markers.is_private,
                                 self.lower.xattr_path(node.lower), extra=extra)
            else:
                os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=work)
                copyup.copy_meta(st, layer.work_path(tmp), self.markers.is_private,
                                 self.lower.xattr_path(node.lower), extra=extra)
            # From here on synchronous: the names and parents we use are current.
            if not node.links:
                raise _err(errno.ENOENT)
            links = list(node.links)
            first_parent, first_name = links[0]
            unknown = st.st_nlink - len(links)
            if key is not None and unknown > 0:
                layer.set_marker(work, tmp, self.markers.nlink, b"%d" % unknown)
                try:
                    os.link(tmp, key, src_dir_fd=work, dst_dir_fd=index)
                except FileExistsError:  # left by a crash: the new copy replaces it
                    os.unlink(key, dir_fd=index)
                    os.link(tmp, key, src_dir_fd=work, dst_dir_fd=index)
                indexed = True
            renameat2(work, tmp, self.upper_dirfd(first_parent, layer), first_name,
                      RENAME_NOREPLACE)
        except BaseException:
            if indexed:
                os.unlink(key, dir_fd=index)
            self._discard(tmp, layer)
            raise
        # The commit point: the copy is in place.  From here on nothing raises (memory and
        # disk would disagree, and a retry would find the name taken); what fails is
        # logged and counted.
        if indexed:
            node.index_key, node.nlink_delta = key, unknown
        node.upper = True
        try:
            new = os.stat(first_name, dir_fd=self.upper_dirfd(first_parent, layer),
                          follow_symlinks=False)
            self.table.rebind(node, (layer.tag, new.st_dev, new.st_ino))
        except OSError as e:
            self._after_commit("copy-up of %r: stat: %s" % (first_name, e))
        # Lower hard links known under several names stay one inode: link them all (the
        # names of the same layer: a link cannot cross layers).
        for parent, name in links[1:]:
            if self.layer_for(parent, name) is not layer:
                continue
            try:
                os.link(first_name, name, src_dir_fd=self.upper_dirfd(first_parent, layer),
                        dst_dir_fd=self.upper_dirfd(parent, layer), follow_symlinks=False)
            except OSError as e:
                self._after_commit("copy-up of %r: its name %r stays the lower file's "
                                   "after a remount: %s" % (first_name, name, e))
        try:
            self._repoint_readers(node)
        except OSError as e:
            self._after_commit("copy-up of %r: open readers: %s" % (first_name, e))

    def _after_commit(self, message: str) -> None:
        """A failure after a change was committed to disk: the change stands."""
        self.failures_after_commit += 1
        log.error("%s (the change itself is done)", message)

    async def _copy_regular(self, node: Node, st: os.stat_result, tmp: bytes,
                            data_limit: int | None, extra: dict[bytes, bytes],
                            layer: UpperLayer, flags: int) -> None:
        size = st.st_size if data_limit is None else min(st.st_size, data_limit)
        src = self.lower.open(node.lower) if size else -1
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=layer.work_fd)
            try:
                if size > INLINE_COPY:
                    await offload(copyup.copy_data, src, dst, size)
                elif size:
                    copyup.copy_data(src, dst, size)
                # Metadata after the data: writing drops file capabilities.
                copyup.copy_meta(st, dst, self.markers.is_private,
                                 self.lower.xattr_path(node.lower), extra=extra)
                if flags:
                    add_inode_flags(dst, flags)
                await offload(os.fsync, dst)
            finally:
                os.close(dst)
        finally:
            if src >= 0:
                os.close(src)

    def _repoint_readers(self, node: Node) -> None:
        """Read-only handles opened before the copy-up now read the upper copy (an idle
        descriptor is closed instead)."""
        if id(node) in self._idle:
            self._close_idle(id(node))
        for fd in node.open_fds:
            file = self._open_files.get(fd)
            if file is None or not file.on_lower:
                continue
            parent, name = node.links[0]
            new = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=self.upper_dirfd(parent, self._lay(node)))
            os.dup2(new, fd, inheritable=False)
            os.close(new)
            file.on_lower = False

    def _discard(self, tmp: bytes, layer: UpperLayer | None = None) -> None:
        layer = layer or self.upper
        try:
            layer.remove_tree(layer.work_fd, tmp)
        except OSError as e:
            log.warning("could not remove work file %r: %s", tmp, e)

    # ----------------------------------------------------------- new entries

    def _lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether `name` exists below `parent` in the lower layer (so needs a whiteout)."""
        if parent.lower is None:
            return False
        try:
            os.stat(name, dir_fd=self.lower.dirfd(parent.lower), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def new_entry(self, parent: Node, uid: int, gid: int, mode: int,
                  umask: int = 0) -> tuple[int, int, int, dict[bytes, bytes]]:
        """Owner, mode and ACL xattrs of a new entry: the caller's owner, or the group of
        a setgid dir; the mode the parent's default ACL leaves, or `mode` less `umask`
        (see rofs.acl)."""
        pst = self._stat(parent)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        acls: dict[bytes, bytes] = {}
        if stat.S_ISLNK(mode):
            return uid, gid, mode, acls
        default = acl.default_of(*self._any_target(parent))
        if default is None:
            return uid, gid, mode & ~(umask & 0o777), acls
        mode, access = acl.inherit(default, mode)
        if access is not None:
            acls[acl.ACCESS] = access
        if stat.S_ISDIR(mode):
            acls[acl.DEFAULT] = default
        return uid, gid, mode, acls

    @staticmethod
    def _set_acls(target: bytes | int, acls: dict[bytes, bytes]) -> None:
        # After the chmod: an access ACL sets the group class bits of the mode itself.
        for name, value in acls.items():
            os.setxattr(target, name, value, follow_symlinks=isinstance(target, int))

    def _place(self, parent: Node, name: bytes, is_dir: bool, make) -> Node:
        """Create a new entry: `make(layer, tmp)` builds it in the work dir of its layer,
        complete with owner and mode; one rename then makes it visible."""
        if self.lookup(parent, name) is not None:
            raise _err(errno.EEXIST)
        self.check_unprotected(parent, appending=True)
        layer = self.layer_for(parent, name)
        up = self.upper_dirfd(parent, layer)
        work = layer.work_fd
        existing = layer.try_stat(up, name)
        over_whiteout = existing is not None and is_whiteout(existing)
        if existing is not None and not over_whiteout:
            raise _err(errno.EEXIST)
        tmp = layer.temp_name()
        try:
            make(layer, tmp)
            if is_dir and over_whiteout:
                # Whatever the lower has under this name stays hidden.
                layer.set_marker(work, tmp, self.markers.opaque, b"y")
            st = os.stat(tmp, dir_fd=work, follow_symlinks=False)  # (rename keeps it)
            if over_whiteout and is_dir:
                renameat2(work, tmp, up, name, RENAME_EXCHANGE)
            elif over_whiteout:
                renameat2(work, tmp, up, name, 0)
            else:
                renameat2(work, tmp, up, name, RENAME_NOREPLACE)
        except BaseException:
            self._discard(tmp, layer)
            raise
        # The commit point: the entry is in place; nothing below fails the request.
        if over_whiteout and is_dir:
            try:
                os.unlink(tmp, dir_fd=work)  # the whiteout, swapped out
            except OSError as e:  # left in the work dir, which the next mount empties
                self._after_commit("mkdir of %r: %s" % (name, e))
        node = self.table.find_or_add(parent, name, st.st_mode, upper=True, lower=None,
                                      backing=(layer.tag, st.st_dev, st.st_ino))
        node.layer = None if layer is self.upper else layer
        node.prot = 0  # new: no inode flags
        return node

    @_changes_names
    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int,
               pid: int = 0, umask: int = 0) -> tuple[FileHandle, Node]:
        self.check_writable(parent, name)
        self._check_files(uid)  # before the file exists: a refused create makes none
        uid, gid, mode, acls = self.new_entry(parent, uid, gid, stat.S_IFREG | mode, umask)
        fds = []

        def make(layer: UpperLayer, tmp: bytes) -> None:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0,
                         dir_fd=layer.work_fd)
            fds.append(fd)
            copyup.chown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(mode))
            self._set_acls(fd, acls)

        try:
            node = self._place(parent, name, False, make)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        fd = fds[0]
        if flags & os.O_APPEND:
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
        return self._register(fd, node, flags, False, pid, uid), node

    @_changes_names
    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int,
              umask: int = 0) -> Node:
        self.check_writable(parent, name)
        uid, gid, mode, acls = self.new_entry(parent, uid, gid, stat.S_IFDIR | mode, umask)

        def make(layer: UpperLayer, tmp: bytes) -> None:
            os.mkdir(tmp, 0o700, dir_fd=layer.work_fd)
            path = layer.work_path(tmp)
            copyup.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(mode))
            self._set_acls(path, acls)

        return self._place(parent, name, True, make)

    @_changes_names
    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int,
              gid: int, umask: int = 0) -> Node:
        self.check_writable(parent, name)
        uid, gid, mode, acls = self.new_entry(parent, uid, gid, mode, umask)
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise _err(errno.EINVAL)
        if stat.S_ISCHR(mode) and rdev == 0:
            # A 0/0 character device is the whiteout format: stored, it would delete
            # the name instead of creating it.
            raise _err(errno.EPERM)

        def make(layer: UpperLayer, tmp: bytes) -> None:
            os.mknod(tmp, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=layer.work_fd)
            path = layer.work_path(tmp)
            copyup.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(mode))
            self._set_acls(path, acls)

        return self._place(parent, name, False, make)

    @_changes_names
    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        self.check_writable(parent, name)
        uid, gid, _, _ = self.new_entry(parent, uid, gid, stat.S_IFLNK)

        def make(layer: UpperLayer, tmp: bytes) -> None:
            os.symlink(target, tmp, dir_fd=layer.work_fd)
            copyup.chown(tmp, uid, gid, dir_fd=layer.work_fd, follow_symlinks=False)

        return self._place(parent, name, False, make)

    @_changes_names
    async def link(self, node: Node, parent: Node, name: bytes) -> Node:
        self.check_writable(parent, name)
        if node.is_dir:
            raise _err(errno.EPERM)
        while True:
            if self.lookup(parent, name) is not None:
                raise _err(errno.EEXIST)
            self.check_unprotected(node)
            self.check_unprotected(parent, appending=True)
            if node.upper:
                break
            await self.copy_up(node)
        if not node.links:
            raise _err(errno.ENOENT)
        # Synchronous from here.
        layer = self._lay(node)
        if self.layer_for(parent, name) is not layer:
            raise _err(errno.EXDEV)  # a scratch name for a persistent file, or back
        src_parent, src_name = node.links[0]
        up = self.upper_dirfd(parent, layer)
        src_fd = self.upper_dirfd(src_parent, layer)
        existing = layer.try_stat(up, name)
        if existing is not None and is_whiteout(existing):
            work = layer.work_fd
            tmp = layer.temp_name()
            os.link(src_name, tmp, src_dir_fd=src_fd, dst_dir_fd=work, follow_symlinks=False)
            try:
                renameat2(work, tmp, up, name, 0)
            except BaseException:
                self._discard(tmp, layer)
                raise
        elif existing is not None:
            raise _err(errno.EEXIST)
        else:
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=up, follow_symlinks=False)
        self.table.add_link(node, parent, name)
        return node

    # --------------------------------------------------------------- removal

    @_changes_names
    async def unlink(self, parent: Node, name: bytes) -> None:
        self.check_writable(parent, name)
        while True:
            node = self.lookup(parent, name)
            if node is None:
                raise _err(errno.ENOENT)
            if node.is_dir:
                raise _err(errno.EISDIR)
            self.check_unprotected(parent, node)
            if not self._lower_hard_link(node):
                break
            await self.copy_up(node)
        self._losing_name(node)
        self._remove_entry(parent, name, node)
        self.table.remove_link(node, parent, name)

    def _lower_hard_link(self, node: Node) -> bool:
        """A lower file with several names, not copied up: removing one of its names
        must change its link count for good, so it is copied up first (through the
        index if some names are unknown), like overlayfs index=on does."""
        return (not node.upper and not node.is_dir and node.lower is not None
                and self.lower.stat(node.lower).st_nlink > 1)

    def _losing_name(self, node: Node) -> None:
        """`node` is about to lose a name.  If it is the last one, keep what the kernel
        may still ask for: a symlink's target, and the object itself (O_PATH)."""
        if len(node.links) != 1:
            return
        if id(node) in self._idle:
            self._close_idle(id(node))
        if stat.S_ISLNK(node.mode):
            self.readlink(node)
        if node.upper and node.keep_fd < 0 and (node.lookups > 0 or node.open_fds):
            parent, name = node.links[0]
            node.keep_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=self.upper_dirfd(parent, self._lay(node)))

    @_changes_names
    def rmdir(self, parent: Node, name: bytes) -> None:
        self.check_writable(parent, name)
        node = self.lookup(parent, name)
        if node is None:
            raise _err(errno.ENOENT)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node is self.root or name in (b".", b".."):
            raise _err(errno.EBUSY if node is self.root else errno.EINVAL)
        self.check_unprotected(parent, node)
        if self.list_names(node):
            raise _err(errno.ENOTEMPTY)
        self._losing_name(node)
        self._remove_entry(parent, name, node)
        self._kill_dir(node)
        self.table.remove_link(node, parent, name)

    def _kill_dir(self, node: Node) -> None:
        self._drop_dirfds(node)
        node.upper = False
        node.lower = None

    def _remove_entry(self, parent: Node, name: bytes, node: Node) -> None:
        """Make `name` disappear from the merged view, leaving a whiteout if the lower
        layer has something under that name."""
        layer = self._lay(node)
        up = self.upper_dirfd(parent, layer)
        work = layer.work_fd
        if node.is_dir:
            self._drop_mirrors(parent, name, layer)
        if not node.upper:  # shown from the lower layer, so the lower has the name
            layer.make_whiteout(up, name)
            return
        if self._lower_has(parent, name):
            tmp = layer.temp_name()
            layer.make_whiteout(work, tmp)
            try:
                renameat2(work, tmp, up, name, RENAME_EXCHANGE if node.is_dir else 0)
            except BaseException:
                self._discard(tmp, layer)
                raise
            if node.is_dir:
                self._discard(tmp, layer)  # the old directory, with its whiteouts
        elif node.is_dir:
            tmp = layer.temp_name()
            renameat2(up, name, work, tmp, RENAME_NOREPLACE)
            self._discard(tmp, layer)
        else:
            os.unlink(name, dir_fd=up)

    def _holds_other_class(self, parent: Node, name: bytes, node: Node) -> bool:
        """Whether directory `node` has entries in the other layer's mirror (changes to
        paths of another class below it): those stay at their path, so the directory
        cannot move in one rename."""
        if not node.is_dir or self.scratch_layer is None:
            return False
        home = self._lay(node)
        for layer in self._layers():
            if layer is home:
                continue
            up = self.upper_dirfd(parent, layer, create=False)
            if up is None or layer.try_stat(up, name) is None:
                continue
            fd = open_listable(up, name)
            try:
                with os.scandir(fd) as entries:
                    if any(True for _ in entries):
                        return True
            finally:
                os.close(fd)
        return False

    def _drop_mirrors(self, parent: Node, name: bytes, home: UpperLayer) -> None:
        """A directory going away takes its mirror in the other layer along (it holds
        at most whiteouts: the directory is empty in the merged view)."""
        for layer in self._layers():
            if layer is home:
                continue
            up = self.upper_dirfd(parent, layer, create=False)
            if up is not None and layer.try_stat(up, name) is not None:
                scratch.detach(layer, up, name)

    # ---------------------------------------------------------------- revert

    @_changes_names
    def revert(self, path: tuple[bytes, ...]) -> tuple[int, bytes] | None:
        """Drop every change at `path` (a whole tree for a directory): its upper entry
        goes, so the lower shows through again.  Returns the (parent inode, name) entry
        the kernel must forget, or None if nothing at `path` had changed (ENOENT when
        there is nothing at `path` at all).

        Nodes under `path` lose their names, as if unlinked: open files keep working,
        and the next lookup finds the lower object afresh.
        """
        parent = self._walk_to_parent(path)
        name = path[-1]
        layer = self.layer_for(parent, name)
        up = self.upper_dirfd(parent, layer, create=False) if (
            parent.upper or layer is not self._lay(parent)) else None
        if up is None or layer.try_stat(up, name) is None:
            if self.lookup(parent, name) is None:
                raise _err(errno.ENOENT)  # a typo, not "unchanged"
            return None
        affected = self._names_below(parent, name)
        scratch.detach(layer, up, name)
        self._unname(affected)
        return parent.ino, name

    def _walk_to_parent(self, path: tuple[bytes, ...]) -> Node:
        if not path:
            raise _err(errno.EINVAL)
        parent = self.root
        for name in path[:-1]:
            parent = self.lookup(parent, name)
            if parent is None or not parent.is_dir:
                raise _err(errno.ENOENT)
        return parent

    def _names_below(self, parent: Node, name: bytes) -> list[tuple[Node, bytes, Node]]:
        """The names the node table knows at parent/name and below, which an entry
        replaced behind the kernel's back takes away (EBUSY while one of them is
        being copied up).  The caller replaces the entry, then calls _unname."""
        top = self.table.dentries.get((parent.ino, name))
        affected: list[tuple[Node, bytes, Node]] = []
        if top is None:
            return affected
        children: dict[int, list[tuple[bytes, Node]]] = {}
        if top.is_dir:
            for (pino, cname), child in self.table.dentries.items():
                children.setdefault(pino, []).append((cname, child))
        pending = [(parent, name, top)]
        while pending:
            p, n, node = pending.pop()
            if node.ino in self._copying:
                raise _err(errno.EBUSY)
            affected.append((p, n, node))
            pending += [(node, c, child) for c, child in children.get(node.ino, ())]
        self._losing_name(top)
        return affected

    def _unname(self, affected: list[tuple[Node, bytes, Node]]) -> None:
        """Nodes lose the names _names_below found, as if unlinked: open files keep
        working, and the next lookup finds what is on disk now."""
        for p, n, node in reversed(affected):
            self._drop_dirfds(node)
            self.table.remove_link(node, p, n)

    @_changes_names
    def restore(self, path: tuple[bytes, ...], src_fd: int, src_name: bytes
                ) -> tuple[int, bytes]:
        """Put an entry set aside (rofs.attic) back at `path` in the persistent upper
        layer: src_fd/src_name is renamed there.  Returns the (parent inode, name) entry
        the kernel must forget.

        EEXIST when the upper layer has an entry of its own there now (a change made
        since), EXDEV when this mount's policy makes `path` scratch (it would not be
        seen, and the next mount would set it aside again), ENOENT when its parent
        directory is gone from the merged view.
        """
        parent = self._walk_to_parent(path)
        name = path[-1]
        if self.layer_for(parent, name) is not self.upper:
            raise _err(errno.EXDEV)
        up = self.upper_dirfd(parent, self.upper, create=False)
        if up is not None and self.upper.try_stat(up, name) is not None:
            raise _err(errno.EEXIST)
        affected = self._names_below(parent, name)
        up = self.upper_dirfd(parent, self.upper)
        renameat2(src_fd, src_name, up, name, RENAME_NOREPLACE)
        attic.relink_index(self.upper, up, name)
        self._unname(affected)
        return parent.ino, name

    # ---------------------------------------------------------------- rename

    @_changes_names
    async def rename(self, src_parent: Node, src_name: bytes, dst_parent: Node,
                     dst_name: bytes, flags: int = 0) -> None:
        self.check_writable(src_parent, src_name)
        self.check_writable(dst_parent, dst_name)
        self.check_movable(src_parent, src_name)
        if flags & RENAME_EXCHANGE:
            self.check_movable(dst_parent, dst_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
                flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        exchange = bool(flags & RENAME_EXCHANGE)
        prepared: list = []  # a big file's copy for a move across layers, made off the loop
        try:
            await self._rename(src_parent, src_name, dst_parent, dst_name, flags, exchange,
                               prepared)
        finally:
            for tmp, _, layer in prepared:
                self._discard(tmp, layer)

    async def _rename(self, src_parent: Node, src_name: bytes, dst_parent: Node,
                      dst_name: bytes, flags: int, exchange: bool, prepared: list) -> None:
        """rename's work.  `prepared` holds (tmp, signature, layer) of a copy made for a
        move across layers, which the caller discards unless the move consumed it."""
        while True:
            src = self.lookup(src_parent, src_name)
            if src is None:
                raise _err(errno.ENOENT)
            dst = self.lookup(dst_parent, dst_name)
            if dst is not None and flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST)
            if dst is None and exchange:
                raise _err(errno.ENOENT)
            if dst is src:
                return  # two names of one inode (or the same name): nothing to do
            # The source loses a name; so does an exchanged or replaced destination.
            self.check_unprotected(src_parent, src, dst)
            self.check_unprotected(dst_parent, appending=dst is None)
            self._check_rename(src, src_parent, dst, dst_parent, exchange)
            layer = self.layer_for(dst_parent, dst_name)
            if layer is not self._lay(src) and (src.is_dir or exchange):
                raise _err(errno.EXDEV)  # across classes: mv copies and deletes
            if self._holds_other_class(src_parent, src_name, src) or (
                    exchange and self._holds_other_class(dst_parent, dst_name, dst)):
                raise _err(errno.EXDEV)
            if not self.markers.redirects and (
                    self._needs_redirect(src, dst_parent, dst_name) or
                    exchange and self._needs_redirect(dst, src_parent, src_name)):
                raise _err(errno.EXDEV)  # no redirects with user.overlay.* (as the kernel)
            if not exchange and dst is not None and dst.is_dir and self.list_names(dst):
                raise _err(errno.ENOTEMPTY)  # after EXDEV, as the kernel checks
            if not src.upper:
                await self.copy_up(src)
                continue
            if exchange and not dst.upper:
                await self.copy_up(dst)
                continue
            if not exchange and dst is not None and self._lower_hard_link(dst):
                await self.copy_up(dst)
                continue
            if layer is not self._lay(src) and not prepared and \
                    await self._prepare_across(src, src_parent, src_name, layer, prepared):
                continue  # the world may have changed while the data was copied
            break
        # Synchronous from here: nothing else runs until the rename is done.
        if layer is not self._lay(src):
            self._move_across(src, src_parent, src_name, dst, dst_parent, dst_name, layer,
                              prepared)
            return
        sup = self.upper_dirfd(src_parent, layer)
        dup = self.upper_dirfd(dst_parent, layer)
        if src.is_dir:
            self._mark_moved_dir(src, sup, src_name, dst_parent, dst_name, layer)
            self._drop_mirrors(src_parent, src_name, layer)
        if exchange:
            if dst.is_dir:
                self._mark_moved_dir(dst, dup, dst_name, src_parent, src_name, layer)
                self._drop_mirrors(dst_parent, dst_name, layer)
            renameat2(sup, src_name, dup, dst_name, RENAME_EXCHANGE)
            self.table.swap_links(src, src_parent, src_name, dst, dst_parent, dst_name)
            return
        leave_whiteout = self._lower_has(src_parent, src_name)
        if dst is not None:
            self._losing_name(dst)
        existing = layer.try_stat(dup, dst_name)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            self._empty_for_replace(dup, dst_name, layer)
        if existing is not None and is_whiteout(existing) and src.is_dir:
            # A directory cannot replace a non-directory: swap them, then the whiteout
            # now at the source name stays if the lower needs hiding there.
            renameat2(sup, src_name, dup, dst_name, RENAME_EXCHANGE)
            if not leave_whiteout:
                try:
                    os.unlink(src_name, dir_fd=sup)
                except OSError as e:  # a whiteout hiding nothing: harmless
                    self._after_commit("rename of %r: a whiteout stays: %s" % (src_name, e))
        else:
            renameat2(sup, src_name, dup, dst_name, RENAME_WHITEOUT if leave_whiteout else 0)
        # The commit point: what follows does not fail the rename.
        if dst is not None:
            if dst.is_dir:
                try:
                    self._drop_mirrors(dst_parent, dst_name, layer)
                except OSError as e:
                    self._after_commit("rename of %r over directory %r: entries of the "
                                       "other class stay: %s" % (src_name, dst_name, e))
                self._kill_dir(dst)
            self.table.remove_link(dst, dst_parent, dst_name)
        self.table.move_link(src, src_parent, src_name, dst_parent, dst_name)

    async def _prepare_across(self, src: Node, src_parent: Node, src_name: bytes,
                              layer: UpperLayer, prepared: list) -> bool:
        """For a big regular file about to move across layers: copy its data into the
        destination layer's work dir in a worker thread (and fsync it), so the event loop
        keeps serving meanwhile.  _move_across uses the copy if the file has not changed
        since (same signature), else copies again."""
        sup = self.upper_dirfd(src_parent, self._lay(src))
        st = os.stat(src_name, dir_fd=sup, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= INLINE_COPY:
            return False
        fd_in = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sup)
        tmp = layer.temp_name()
        prepared.append((tmp, _signature(st), layer))
        try:
            fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                             dir_fd=layer.work_fd)
            try:
                await offload(copyup.copy_data, fd_in, fd_out, st.st_size)
                await offload(os.fsync, fd_out)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        return True

    def _move_across(self, src: Node, src_parent: Node, src_name: bytes, dst: Node | None,
                     dst_parent: Node, dst_name: bytes, layer: UpperLayer,
                     prepared: list) -> None:
        """Rename a non-directory from one layer to the other (a scratch temporary over
        a persistent file: passwd's nshadow over shadow).  A copy is made complete in
        the destination layer's work dir and renamed over the destination, so readers of
        the destination see the old or the new file; then the source name goes.  The
        node keeps its inode number; descriptors opened before keep the old copy.
        `prepared`: the data of a big file, copied off the loop (_prepare_across); used
        when the file is still the same, and taken from the list when it is."""
        old = self._lay(src)
        sup = self.upper_dirfd(src_parent, old)
        dup = self.upper_dirfd(dst_parent, layer)
        st = os.stat(src_name, dir_fd=sup, follow_symlinks=False)
        work, tmp = layer.work_fd, layer.temp_name()
        extra = {self.markers.ino: b"%d" % src.ino} if layer is self.upper else None
        source = proc_path(sup, src_name)
        ready = None
        if prepared and prepared[0][1] == _signature(st) and prepared[0][2] is layer:
            ready = prepared.pop()[0]
        if dst is not None:
            self._losing_name(dst)
        try:
            if ready is not None:
                tmp = ready
                copyup.copy_meta(st, layer.work_path(tmp), self.markers.is_private, source,
                                 extra=extra)
            elif stat.S_ISREG(st.st_mode):
                fd_in = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=sup)
                try:
                    fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                     0o600, dir_fd=work)
                    try:
                        copyup.copy_data(fd_in, fd_out, st.st_size)
                        copyup.copy_meta(st, fd_out, self.markers.is_private, source,
                                         extra=extra)
                        os.fsync(fd_out)
                    finally:
                        os.close(fd_out)
                finally:
                    os.close(fd_in)
            else:
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src_name, dir_fd=sup), tmp, dir_fd=work)
                else:
                    os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=work)
                copyup.copy_meta(st, layer.work_path(tmp), self.markers.is_private, source,
                                 extra=extra)
            new = os.stat(tmp, dir_fd=work, follow_symlinks=False)  # (rename keeps it)
            renameat2(work, tmp, dup, dst_name, 0)  # over a file or a whiteout, if any
        except BaseException:
            self._discard(tmp, layer)
            raise
        # The commit point: the destination holds the file.  The source name goes now;
        # if it cannot, it stays (a copy, seen at the next lookup: the kernel moves its
        # entry to the destination) and the rename still succeeded.
        try:
            self._remove_source(old, sup, src_parent, src_name)
        except OSError as e:
            self._after_commit("rename of %r to %r across classes: the source name stays: "
                               "%s" % (src_name, dst_name, e))
        if dst is not None:
            self.table.remove_link(dst, dst_parent, dst_name)
        self.table.move_link(src, src_parent, src_name, dst_parent, dst_name)
        src.layer = None if layer is self.upper else layer
        self.table.rebind(src, (layer.tag, new.st_dev, new.st_ino))

    def _remove_source(self, layer: UpperLayer, up: int, parent: Node, name: bytes) -> None:
        """Remove the name of a file moved to the other layer, leaving a whiteout if the
        lower has something under that name."""
        if not self._lower_has(parent, name):
            os.unlink(name, dir_fd=up)
            return
        tmp = layer.temp_name()
        layer.make_whiteout(layer.work_fd, tmp)
        try:
            renameat2(layer.work_fd, tmp, up, name, 0)
        except BaseException:
            self._discard(tmp, layer)
            raise

    def _check_rename(self, src: Node, src_parent: Node, dst: Node | None,
                      dst_parent: Node, exchange: bool) -> None:
        if src.is_dir and self._is_ancestor(src, dst_parent):
            raise _err(errno.EINVAL)
        if exchange:
            if dst.is_dir and self._is_ancestor(dst, src_parent):
                raise _err(errno.EINVAL)
            return
        if dst is None:
            return
        if src.is_dir and not dst.is_dir:
            raise _err(errno.ENOTDIR)
        if dst.is_dir and not src.is_dir:
            raise _err(errno.EISDIR)

    def _is_ancestor(self, node: Node, of: Node) -> bool:
        current: Node | None = of
        while current is not None:
            if current is node:
                return True
            current = current.parent()
        return False

    def _natural_lower(self, parent: Node, name: bytes) -> tuple[bytes, ...] | None:
        """What a directory at parent/name merges with unless redirected: the lower path
        of a lower directory there, () for a lower non-directory, None for nothing."""
        if parent.lower is None:
            return None
        candidate = parent.lower + (name,)
        st = self.lower.try_stat(candidate)
        if st is None:
            return None
        return candidate if stat.S_ISDIR(st.st_mode) else ()

    def _needs_redirect(self, node: Node, new_parent: Node, new_name: bytes) -> bool:
        return node.is_dir and node.lower is not None and \
            node.lower != self._natural_lower(new_parent, new_name)

    def _mark_moved_dir(self, node: Node, old_parent_fd: int, old_name: bytes,
                        new_parent: Node, new_name: bytes, layer: UpperLayer) -> None:
        """Before a directory moves, record what it merges with so the new place shows
        the same content (redirect) or hides the lower there (opaque).  Either marker
        leaves the old place's view unchanged, so a crash before the rename is harmless.
        """
        natural = self._natural_lower(new_parent, new_name)
        if node.lower is not None:
            if node.lower != natural:
                layer.set_marker(old_parent_fd, old_name, self.markers.redirect,
                                 b"/" + b"/".join(node.lower))
        elif natural is not None and natural != ():
            layer.set_marker(old_parent_fd, old_name, self.markers.opaque, b"y")

    def _empty_for_replace(self, dir_fd: int, name: bytes, layer: UpperLayer) -> None:
        """An upper directory about to be replaced must be empty on disk.  It is empty in
        the merged view, so it holds only whiteouts: make it opaque (no visible change),
        then remove them."""
        layer.set_marker(dir_fd, name, self.markers.opaque, b"y")
        fd = open_listable(dir_fd, name)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    layer.remove_tree(fd, os.fsencode(entry.name))
        finally:
            os.close(fd)

    # ------------------------------------------------------------- listing

    def list_names(self, node: Node) -> list[bytes]:
        """The merged directory listing: upper names (minus whiteouts), then the lower
        names the upper does not hide."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        names: list[bytes] = []
        hidden: set[bytes] = set()
        home = self._lay(node)
        base = self.path_of(node) if self.scratch_layer is not None else None
        for layer in self._layers():
            if layer is home:
                up = self.upper_dirfd(node) if node.upper else None
            else:
                up = self.upper_dirfd(node, layer, create=False)
            if up is None:
                continue
            fd = os.open(reopen_listable(up), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = os.fsencode(entry.name)
                        if base is not None and self._class_layer(base + (name,)) \
                                is not layer:
                            continue  # an entry of the other class's layer decides
                        hidden.add(name)
                        if not (entry.is_dir(follow_symlinks=False) or
                                entry.is_file(follow_symlinks=False) or
                                entry.is_symlink()) and is_whiteout(
                                    entry.stat(follow_symlinks=False)):
                            continue
                        names.append(name)
            finally:
                os.close(fd)
        if node.lower is not None:
            try:
                fd = self.lower.open_dir(node.lower)
            except (FileNotFoundError, NotADirectoryError):
                return names
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = os.fsencode(entry.name)
                        if name not in hidden:
                            names.append(name)
            finally:
                os.close(fd)
        return names

    def opendir(self, node: Node, uid: int = 0) -> int:
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        dh = next(self._dir_ids)
        self.dirs[dh] = DirHandle(node, uid)
        return dh

    def readdir(self, dh: int, start: int) -> Iterator[tuple[int, bytes, Node | None]]:
        """Entries from offset `start`: (next offset, name, node); node None for a name
        that cannot be looked up (a r-- directory: EACCES), listed as a native
        filesystem lists it, without attributes.

        The listing is a snapshot taken at the first read (and again on rewind), so
        concurrent creates and removals never shift offsets: nothing is returned twice
        or skipped.  Names removed since the snapshot are left out.  Handles that start
        a pass while no name changed anywhere share one snapshot, so holding many
        handles open on a big directory costs one listing; distinct listings held for
        users other than root are bounded (LISTING_BUDGET names, a quarter of it for one
        user: past it, ENOMEM).
        """
        handle = self.dirs[dh]
        if handle.listing is None or (start == 0 and handle.served):
            self._take_listing(handle)
        handle.served = True
        names = handle.listing.names
        for index in range(start, len(names)):
            name = names[index]
            try:
                node = self.lookup(handle.node, name)
            except FileNotFoundError:
                continue  # removed since the listing was taken
            except OSError:
                yield index + 1, name, None
                continue
            if node is not None:
                yield index + 1, name, node

    def _take_listing(self, handle: DirHandle) -> None:
        node = handle.node
        listing = self._listings.get(node.ino)
        if listing is None or listing.generation != self.generation:
            names = tuple(self.list_names(node))
            uid = handle.uid
            if uid != 0 and (
                    self.listed_names + len(names) > self.listing_budget or
                    self._listed_by_uid[uid] + len(names) > self.listing_budget // 4):
                raise _err(errno.ENOMEM)
            listing = Listing(names, self.generation, uid)
            self._listings[node.ino] = listing
            self.listed_names += len(names)
            self._listed_by_uid[uid] += len(names)
        listing.users += 1  # first: the handle may hold this very listing already
        self._drop_listing(handle)
        handle.listing = listing

    def _drop_listing(self, handle: DirHandle) -> None:
        listing, handle.listing = handle.listing, None
        if listing is None:
            return
        listing.users -= 1
        if listing.users:
            return
        self.listed_names -= len(listing.names)
        self._listed_by_uid[listing.uid] -= len(listing.names)
        if not self._listed_by_uid[listing.uid]:
            del self._listed_by_uid[listing.uid]
        if self._listings.get(handle.node.ino) is listing:
            del self._listings[handle.node.ino]
        if len(listing.names) >= TRIM_AFTER_NAMES:
            del listing
            malloc_trim()  # give a big listing's memory back to the system

    def releasedir(self, dh: int) -> None:
        handle = self.dirs.pop(dh, None)
        if handle is not None:
            self._drop_listing(handle)

    async def fsyncdir(self, node: Node, datasync: bool) -> None:
        if not node.upper:
            return
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.upper_dirfd(node))
        try:
            await offload(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- files

    def _check_files(self, uid: int) -> None:
        """ENFILE when a new open file would take a descriptor this caller may not have
        (users other than root stop short of a reserve that is root's, and each of them
        at a share of the rest)."""
        limit = self.file_limit if uid == 0 else self.user_file_limit
        while self._idle and len(self._open_files) >= limit:
            self._close_idle(next(iter(self._idle)))
        if len(self._open_files) >= limit:
            raise _err(errno.ENFILE)
        if uid != 0 and self._fds_by_uid[uid] >= self.uid_file_limit:
            raise _err(errno.ENFILE)

    def _register(self, fd: int, node: Node, flags: int, on_lower: bool, pid: int,
                  uid: int, shared: bool = False) -> FileHandle:
        file = OpenFile(fd, on_lower, shared, uid)
        self._open_files[fd] = file
        self._fds_by_uid[uid] += 1
        if shared:
            self._readers[id(node)] = file
        if not node.open_fds:
            node.open_fds = set()
        node.open_fds.add(fd)
        return self._handle(file, node, flags, pid, uid)

    def _handle(self, file: OpenFile, node: Node, flags: int, pid: int,
                uid: int) -> FileHandle:
        file.users += 1
        handle = FileHandle(next(self._fhs), file, node, flags, pid, uid)
        self.files[handle.fh] = handle
        return handle

    def open_for_reading(self, node: Node, flags: int, pid: int = 0,
                         uid: int = 0) -> FileHandle:
        """open() without O_WRONLY, O_RDWR or O_TRUNC: synchronous (no copy-up)."""
        if node.is_dir:
            raise _err(errno.EISDIR)
        flags &= OPEN_KEEP_FLAGS
        reader = self._readers.get(id(node))
        if reader is not None and id(node) in self._idle:
            # Out of the idle ones first, so that making room cannot close it.
            del self._idle[id(node)]
            if not reader.on_lower or node.upper:  # copied up since
                self._close_file(reader, node)
                reader = None
            else:
                try:
                    self._check_files(uid)
                except OSError:
                    self._close_file(reader, node)
                    raise
                reader.uid = uid
                self._fds_by_uid[uid] += 1
                return self._handle(reader, node, flags, pid, uid)
        if reader is not None and reader.on_lower == (not node.upper):
            return self._handle(reader, node, flags, pid, uid)
        self._check_files(uid)
        return self._open(node, flags, pid, uid, False)

    async def open(self, node: Node, flags: int, pid: int = 0, uid: int = 0) -> FileHandle:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if not writing:
            return self.open_for_reading(node, flags, pid, uid)
        if node.is_dir:
            raise _err(errno.EISDIR)
        flags &= OPEN_KEEP_FLAGS
        self._check_files(uid)
        self.check_writable(node)
        self.check_unprotected(node, appending=flags & os.O_APPEND and
                               not flags & os.O_TRUNC)
        if not node.upper:
            await self.copy_up(node, data_limit=0 if flags & os.O_TRUNC else None)
        return self._open(node, flags, pid, uid, True)

    def _open(self, node: Node, flags: int, pid: int, uid: int, writing: bool) -> FileHandle:
        # Read-only opens with no flag that changes how reads behave share a descriptor.
        share = not writing and not flags & ~os.O_ACCMODE and id(node) not in self._readers
        if node.upper:
            fd = self._open_upper(node, flags)
            return self._register(fd, node, flags, False, pid, uid, share)
        fd = self.lower.open(node.lower, flags & ~os.O_TRUNC)
        return self._register(fd, node, flags, True, pid, uid, share)

    def _open_upper(self, node: Node, flags: int) -> int:
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if node.links:
            parent, name = node.links[0]
            return os.open(name, flags, dir_fd=self.upper_dirfd(parent, self._lay(node)))
        # unlinked, reopened through /proc/PID/fd
        for fd in (*node.open_fds, node.keep_fd):
            if fd >= 0:
                return os.open(b"/proc/self/fd/%d" % fd, flags & ~os.O_NOFOLLOW)
        raise _err(errno.ENOENT)

    def handle(self, fh: int) -> FileHandle:
        handle = self.files.get(fh)
        if handle is None:
            raise _err(errno.EBADF)
        return handle

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handle(fh).fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return os.pwrite(self.handle(fh).fd, data, offset)

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        """On a handle open for writing (the kernel checks), so on the upper copy."""
        handle = self.handle(fh)
        if handle.on_lower:
            raise _err(errno.EBADF)
        fallocate(handle.fd, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE on the file underneath.  rofs reads and writes with
        pread/pwrite, so moving a shared descriptor's position harms no one."""
        return os.lseek(self.handle(fh).fd, offset, whence)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                              length: int) -> int:
        """In the layers, on a worker thread (a big copy must not stall the loop).  The
        destination is open for writing (the kernel checks), so it is an upper copy;
        between filesystems the kernel answers EXDEV and falls back to its own copy."""
        source, target = self.handle(fh_in), self.handle(fh_out)
        if target.on_lower:
            raise _err(errno.EBADF)
        return await offload(os.copy_file_range, source.fd, target.fd, length, off_in,
                             off_out)

    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.handle(fh).fd
        await offload(os.fdatasync if datasync else os.fsync, fd)

    def release(self, fh: int) -> None:
        handle = self.files.pop(fh, None)
        if handle is None:
            return
        file, node = handle.file, handle.node
        file.users -= 1
        if file.users:
            return
        self._fds_by_uid[file.uid] -= 1
        if not self._fds_by_uid[file.uid]:
            del self._fds_by_uid[file.uid]
        if file.shared and file.on_lower and node.links and \
                self._readers.get(id(node)) is file:
            self._idle[id(node)] = (file, node)
            if len(self._idle) > IDLE_READERS:
                self._close_idle(next(iter(self._idle)))
            return
        self._close_file(file, node)

    def _close_idle(self, key: int) -> None:
        file, node = self._idle.pop(key)
        self._close_file(file, node)

    def _close_file(self, file: OpenFile, node: Node) -> None:
        if file.shared and self._readers.get(id(node)) is file:
            del self._readers[id(node)]
        del self._open_files[file.fd]
        node.open_fds.discard(file.fd)
        if not node.open_fds:
            node.open_fds = NO_FDS
        os.close(file.fd)
        self.table.maybe_drop(node)

    def close(self) -> None:
        for fh in list(self.files):
            self.release(fh)
        while self._idle:
            self._close_idle(next(iter(self._idle)))
        self.fds.close()


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What tells that a file is still the same, with the same data and metadata."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse_ino(value: bytes | None) -> tuple[int | None, bytes | None]:
    """The rofs.ino marker: b"INO" or, for an indexed hard link, b"INO KEY"."""
    if not value:
        return None, None
    parts = value.split()
    try:
        ino = int(parts[0])
    except ValueError:
        return None, None
    return ino, (parts[1] if len(parts) > 1 else None)


def _parse_int(value: bytes | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _index_key(st: os.stat_result) -> bytes:
    """Index name of a lower inode.  The ctime makes an entry of an older lower image
    (where the inode number may belong to another file now) simply never match."""
    return b"%d.%d" % (st.st_ino, st.st_ctime_ns)
