"""What the parts of the Overlay class share: limits, the records of open files and
listings, and small helpers."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

from rofs import crash
from rofs._sys import FS_APPEND_FL, FS_IMMUTABLE_FL, FS_NOATIME_FL, FS_NODUMP_FL, FS_SYNC_FL
from rofs.store.inodes import Node

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
NODE_HANDLES = 256  # see Overlay._node_handles
# Names the listings kept for directories the kernel opened itself (no_open) may hold
# (see Overlay._hashed); the newest listing is kept whatever its size.
HASHED_NAMES = LISTING_BUDGET // 4
OPEN_KEEP_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC |
                   os.O_NONBLOCK)


def _err(code: int, *args) -> OSError:
    return OSError(code, os.strerror(code), *args)


@contextlib.contextmanager
def _held(fd: int):
    """A descriptor of the same open file for offloaded work, the job's own until it
    ends: the handle's may be closed meanwhile (a release, the LRU of node handles) and
    its number given to another file, which the job must never touch."""
    own = os.dup(fd)
    try:
        yield own
    finally:
        os.close(own)


# Calls that may wait on the disk, made on a worker thread (never on the request loop).
def _truncate(fd: int, size: int) -> None:
    crash.pause("disk:wait")  # (tests only)
    os.ftruncate(fd, size)


def _pread(fd: int, size: int, offset: int) -> bytes:
    crash.pause("disk:wait")  # (tests only)
    return os.pread(fd, size, offset)


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

    __slots__ = ("fd", "on_lower", "users", "shared", "uid", "writing", "nowait", "handed")

    def __init__(self, fd: int, on_lower: bool, shared: bool, uid: int,
                 writing: bool = False) -> None:
        self.fd = fd
        self.on_lower = on_lower
        self.users = 0
        self.shared = shared
        self.uid = uid
        self.writing = writing  # open for writing: its close may wait on the disk
        self.nowait = True  # reads may try the page cache alone (RWF_NOWAIT)
        self.handed = 0  # of its handles, those the kernel holds (Files.hand_out)


class FileHandle:
    __slots__ = ("fh", "file", "node", "flags", "pid", "uid", "checked", "handed")

    def __init__(self, fh: int, file: OpenFile, node: Node, flags: int, pid: int,
                 uid: int) -> None:
        self.fh = fh  # what the kernel knows the open file by
        self.file = file
        self.node = node
        self.flags = flags
        self.pid = pid  # the opener: write() itself carries no caller
        self.uid = uid
        # A node handle (no_open): the namespace generation at which writing it was last
        # found allowed (only a change of names can move it to a read-only path).
        self.checked = -1
        self.handed = False  # the kernel holds it (Files.hand_out): journaled

    @property
    def fd(self) -> int:
        return self.file.fd

    @property
    def on_lower(self) -> bool:
        return self.file.on_lower


class Listing:
    """A directory's names as one readdir pass sees them, shared by every handle that
    starts a pass while no name of that directory changed (Overlay._listings holds it
    until then).  It counts against the uid that took it."""

    __slots__ = ("node", "names", "users", "uid")

    def __init__(self, node: Node, names: tuple[bytes, ...], uid: int) -> None:
        self.node = node
        self.names = names
        self.users = 0
        self.uid = uid


class HashedListing:
    """A directory's names in the order of their offsets, a keyed hash of each name, for
    listings by node (no_open, Listings.readdir_by_node): `cookies` and `names` as taken
    from the layers, and `added`, (offset, name) of names given to the directory since,
    in order, folded in when it grows.  Names removed since are still there: a listing
    leaves out names that are gone when it serves them."""

    __slots__ = ("node", "cookies", "names", "added", "taken")

    def __init__(self, node: Node, cookies: list[int], names: list[bytes]) -> None:
        self.node = node
        self.cookies, self.names = cookies, names
        self.added: list[tuple[int, bytes]] = []
        self.taken = len(names)  # names the layers had when it was taken

    def __len__(self) -> int:
        return len(self.names) + len(self.added)


class DirHandle:
    __slots__ = ("node", "listing", "served", "uid")

    def __init__(self, node: Node, uid: int = 0) -> None:
        self.node = node
        self.listing: Listing | None = None
        self.served = False
        self.uid = uid  # who opened it: root's listings are never refused


def _named(args: tuple) -> list[tuple[Node, bytes]]:
    """The (directory, name) pairs among a method's arguments."""
    return [(a, b) for a, b in zip(args, args[1:], strict=False) if isinstance(a, Node)
            and isinstance(b, bytes)]


def _changes_names(method):
    """Marks an Overlay method that adds, removes or moves names: listings taken before
    it ends are not shared with passes that start after it, for the directories named in
    its arguments ((directory, name) pairs), or for all when it names none (revert,
    restore: a path).  (An async one may await a copy-up before it changes anything,
    and a listing taken meanwhile would miss the change: listings are let go of when it
    ends too.)  `generation` moves with every such change, anywhere."""
    if inspect.iscoroutinefunction(method):
        async def wrapper(self, *args, **kwargs):
            named = _named(args)
            self._names_changing(named)
            try:
                return await method(self, *args, **kwargs)
            finally:
                self._names_changing(named, True)
    else:
        def wrapper(self, *args, **kwargs):
            named = _named(args)
            self._names_changing(named)
            try:
                return method(self, *args, **kwargs)
            finally:
                self._names_changing(named, True)
    return functools.wraps(method)(wrapper)


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
