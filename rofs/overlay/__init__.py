"""The merged view: kernel-overlayfs semantics over a lower and an upper directory.

This package knows nothing of the FUSE protocol; it works on two directory descriptors.
What it needs of the request loop (work offloaded to a thread, an event to wait on)
comes in as `loop` (rofs.fuse.Loop's interface), so it can be driven directly in tests
(`rofs.fuse.run_inline` runs its coroutines).

Concurrency.  All methods run on one thread (the FUSE loop's, rofs.fuse.session).
Synchronous methods and the synchronous stretches of the async ones are atomic with
respect to every other request: nothing else runs until the next `await`.  The only
awaits are the slow parts of a copy-up (data copy, fsync) and fsync requests, which run
on worker threads (`loop.offload`).  So:
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
import itertools
import logging
import os
import resource
import stat

from rofs._sys import FS_APPEND_FL, FS_IMMUTABLE_FL, get_inode_flags, set_inode_flags
from rofs.overlay.base import (
    LISTING_BUDGET,
    PROTECTION_FLAGS,
    Attr,
    DirHandle,
    FileHandle,
    HashedListing,
    Listing,
    OpenFile,
    _err,
)
from rofs.overlay.copying import CopyUp
from rofs.overlay.durable import Durable
from rofs.overlay.files import Files
from rofs.overlay.listings import Listings
from rofs.overlay.names import Names
from rofs.overlay.renames import Renames
from rofs.overlay.resume import Resume
from rofs.overlay.view import View
from rofs.store import origin
from rofs.store.closer import KEPT, Closer
from rofs.store.inodes import ROOT_INO, Node, NodeTable
from rofs.store.layers import DirFdCache, LowerLayer, Markers, UpperLayer
from rofs.store.policy import Class, Policy

log = logging.getLogger(__name__)

__all__ = ["Attr", "Overlay"]


class Overlay(View, Listings, CopyUp, Names, Renames, Files, Durable, Resume):
    """The merged view of `lower_fd` (never written) and `upper_fd` (all changes)."""

    def __init__(self, lower_fd: int, upper_fd: int, work_fd: int,
                 markers: Markers | None = None, *, index_fd: int | None = None,
                 fd_cache_size: int = 4096, loop) -> None:
        # Descriptors: the directory cache gets a quarter of the limit (at most
        # fd_cache_size), some stay for everything else, and open files get the rest;
        # of those, users other than root may hold all but a reserve, so that however
        # many files they keep open, root can still open, list and change /etc.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.loop = loop  # the request loop's offload and events (rofs.fuse.Loop)
        self.fds = DirFdCache(max(16, min(fd_cache_size, limit // 4)))
        self.file_limit = max(32, limit - self.fds.capacity - 64 - limit // 32)
        self.user_file_limit = self.file_limit - max(16, self.file_limit // 8)
        # ... and one user at most a quarter of what users may hold, so that one user
        # holding files open does not shut the others out either.
        self.uid_file_limit = max(16, self.user_file_limit // 4)
        self._fds_by_uid: collections.Counter = collections.Counter()
        # Closes that may wait on the disk, off the loop (they still count as open).
        self.closer = Closer()
        self.lower = LowerLayer(lower_fd, self.fds)
        self.upper = UpperLayer(upper_fd, work_fd, markers or Markers())
        self.markers = self.upper.markers
        self.upper.index_fd = index_fd
        # The base store (rofs/store/origin.py), where copy-ups keep the text a later merge
        # with a new image needs; None: kept nowhere.
        self.base_writer: origin.BaseWriter | None = None
        self.table = NodeTable(self.lower.dev, self.upper.dev,
                               lambda fd: self.closer.close(fd, KEPT))
        root_st = os.fstat(upper_fd)
        self.root = Node(ROOT_INO, stat.S_IFDIR, upper=True, lower=(),
                         backing=("U", root_st.st_dev, root_st.st_ino))
        self.root.lookups = 1
        self.table.add_root(self.root)
        self._copying: dict = {}  # inode -> the event its copy-up sets when done
        self.failures_after_commit = 0  # see _after_commit
        # Durability (rofs/overlay/durable.py): directories whose entries changed since
        # the last batch of fsyncs, (st_dev, st_ino) -> a descriptor of each; moved
        # directories whose marker was set (descriptors); the last batch started;
        # fsyncs of the state that failed.
        self._unsynced: dict[tuple[int, int], int] = {}
        self._unsynced_objects: list[int] = []
        self._sync_tail = None
        self.sync_failures = 0
        self.files: dict[int, FileHandle] = {}  # fh -> handle
        self._open_files: dict[int, OpenFile] = {}  # fd -> its descriptor's record
        self._readers: dict[int, OpenFile] = {}  # id(node) -> its shared read-only one
        # Shared read-only descriptors of lower files whose last handle was released,
        # kept for the next open (an open+read+close of /etc/passwd then costs no
        # open(2) or close(2) here): least recently used first, at most IDLE_READERS.
        # They count against nobody's share, and go first when descriptors run short.
        self._idle: collections.OrderedDict[int, tuple[OpenFile, Node]] = \
            collections.OrderedDict()
        # With no_open (ops.py) the kernel opens files itself and asks for their data
        # by node: each node's descriptor (read-only, or read-write once written) is
        # kept in a handle of rofs's own, least recently used first, at most
        # NODE_HANDLES of them (an evicted one is released as if the kernel had).
        self._node_handles: collections.OrderedDict[int, FileHandle] = \
            collections.OrderedDict()
        self._fhs = itertools.count(1)
        self.dirs: dict[int, DirHandle] = {}
        # Listings (readdir snapshots): shared per directory while none of its names
        # changed, and bounded in names held for users other than root.  `generation`
        # moves with every change of names anywhere (base._changes_names).
        self.generation = 0
        self._listings: dict[int, Listing] = {}  # directory inode -> its newest
        self.listed_names = 0  # names held by the listings of open handles
        self._listed_by_uid: collections.Counter = collections.Counter()
        self.listing_budget = LISTING_BUDGET
        self._dir_ids = itertools.count(1)
        # A successor's way back to what the kernel holds (rofs/overlay/resume.py).
        self.journal = None
        self._resumable: dict = {}
        self._survivors: dict = {}
        self._first_own_handle = 0
        # Listings of directories the kernel opened itself (no_open), in the order of
        # a keyed hash of each name (readdir_by_node): directory inode -> its
        # HashedListing, least recently used first, HASHED_NAMES names at most.
        self._hashed: collections.OrderedDict[int, HashedListing] = \
            collections.OrderedDict()
        self._hashed_names = 0
        self._hash_key = os.urandom(16)
        # Listings being read (Listings.read_listing), one per directory at a time:
        # directory inode -> an event set when it is read, and the names changed there
        # meanwhile (None: a change naming no directory).
        self._scanning: dict[int, object] = {}  # of loop.event()
        self._changed_while_read: dict[int, list] = {}
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
                "idle_fds": len(self._idle), "node_handles": len(self._node_handles),
                "open_dirs": len(self.dirs), "listed_names": self.listed_names,
                "kept_listings": len(self._hashed),
                "dir_fds": len(self.fds),
                "copy_ups": len(self._copying),
                "failures_after_commit": self.failures_after_commit,
                "sync_failures": self.sync_failures,
                "kept_deleted": sum(1 for n in self.table.nodes.values() if n.keep_fd >= 0)}
