"""Lookup and the view: nodes, attributes, xattrs, listings."""

from __future__ import annotations

import bisect
import errno
import functools
import hashlib
import heapq
import logging
import os
import stat
from collections.abc import Callable, Iterator

from rofs import crash
from rofs._sys import malloc_trim, proc_path
from rofs.overlay.base import (
    HASHED_NAMES,
    NAME_MAX,
    TRIM_AFTER_NAMES,
    Attr,
    DirHandle,
    HashedListing,
    Listing,
    _err,
    _index_key,
    _parse_ino,
    _parse_int,
)
from rofs.store import acl, copyup
from rofs.store.inodes import Node
from rofs.store.layers import (
    UpperLayer,
    getxattr_or_none,
    is_whiteout,
    open_dir_fd,
    reopen_listable,
)

log = logging.getLogger(__name__)

# Names given to a directory listed by node are kept apart until there are more than
# this (and a sixteenth of the listing), then folded in (View._hashed_add).
FOLD_AFTER = 4096


def _first(pair: tuple[int, bytes]) -> int:
    return pair[0]


# Directories whose layers' sizes add up to more than this (about a thousand names on
# ext4) are read on a worker thread when a listing of them is taken, so that reading a
# user's big directory never holds the loop (and everyone's requests) up.
BIG_DIRECTORY = 64 << 10


def _ALL(name: bytes) -> bool:
    return True


def _of_layer(class_layer, base: tuple[bytes, ...], layer, name: bytes) -> bool:
    return class_layer(base + (name,)) is layer


def _merged(sources: list[tuple[int, Callable[[bytes], bool] | None]]) -> Iterator[bytes]:
    """The merged listing of View._sources: upper names (minus whiteouts), then the
    lower names no upper entry hides.  Closes every descriptor, read or not."""
    hidden: set[bytes] = set()
    try:
        for fd, mine in sources:
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = os.fsencode(entry.name)
                    if mine is None:
                        if name not in hidden:
                            yield name
                        continue
                    if not mine(name):
                        continue  # an entry of the other class's layer decides
                    hidden.add(name)
                    if not (entry.is_dir(follow_symlinks=False) or
                            entry.is_file(follow_symlinks=False) or
                            entry.is_symlink()) and is_whiteout(
                                entry.stat(follow_symlinks=False)):
                        continue
                    yield name
    finally:
        for fd, _ in sources:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_on_worker(read, *args):
    crash.pause("listing:read")
    return read(*args)


def _cookie(key: bytes, name: bytes) -> int:
    """A name's offset in listings by node: its keyed hash, past . and .."""
    return (int.from_bytes(hashlib.blake2b(name, key=key, digest_size=8).digest(),
                           "little") >> 3) + 3


def _collect_hashed(sources: list, limit: int | None, key: bytes
                    ) -> tuple[list[int], list[bytes]]:
    """_collect's names in the order of their offsets (_cookie), and the offsets.
    Sorted as plain integers (a sort holds the interpreter, and one of tuples takes
    several times as long), names by offset from a dict."""
    listed = _collect(sources, limit)
    by_cookie = {_cookie(key, name): name for name in listed}
    if len(by_cookie) < len(listed):  # two names with one offset: keep both
        pairs = sorted((_cookie(key, name), name) for name in listed)
        return [c for c, _ in pairs], [n for _, n in pairs]
    cookies = sorted(by_cookie)
    return cookies, [by_cookie[c] for c in cookies]


def _collect(sources: list, limit: int | None) -> list[bytes]:
    """The names of _merged(sources), ENOMEM past `limit` of them (None: no limit)."""
    names: list[bytes] = []
    merged = _merged(sources)
    try:
        for name in merged:
            names.append(name)
            if limit is not None and len(names) > limit:
                raise _err(errno.ENOMEM)
    finally:
        merged.close()
    return names


class View:
    """Overlay's lookup and the view (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

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
                    # The lookup fails (the next one tries again): shown from the lower,
                    # the name would be another inode, with the content of before.
                    log.warning("cannot link %r to its copied-up hard link: %s", name, e)
                    raise
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
        up = self.upper_dirfd(parent, layer)
        os.link(key, name, src_dir_fd=index, dst_dir_fd=up, follow_symlinks=False)
        self._entries_changed(layer, up)
        crash.point("materialize:linked")
        ino = _parse_ino(getxattr_or_none(proc_path(index, key), self.markers.ino))[0]
        self._index_linked(key, layer, self.table.get(ino or 0))

    def _index_linked(self, key: bytes, layer: UpperLayer, node: Node | None) -> None:
        """One more name of the indexed hard link `key` is linked in the upper layer:
        the index serves one name fewer, and none at 0, when its entry goes.  Linking
        comes first: a crash in between leaves the count one high (st_nlink shows one
        more), never a name split off its inode."""
        index = layer.index_fd
        path = proc_path(index, key)
        remaining = _parse_int(getxattr_or_none(path, self.markers.nlink)) - 1
        if remaining > 0:
            os.setxattr(path, self.markers.nlink, b"%d" % remaining, follow_symlinks=False)
        else:
            os.removexattr(path, self.markers.nlink, follow_symlinks=False)
            os.unlink(key, dir_fd=index)
            self._entries_changed(layer, index)
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
        if node.is_dir and ino in self._hashed and self.table.get(ino) is not node:
            # gone from the kernel and from the table: its listing (no_open) goes too
            self._hashed_names -= len(self._hashed.pop(ino))

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

    def getattr(self, node: Node, st: os.stat_result | None = None) -> Attr:
        if st is None:
            st = self._stat(node)
        nlink = st.st_nlink
        if node.is_dir:
            if node.upper and node.lower is not None:
                nlink = 1  # like overlayfs: counting subdirs of a merge is not worth it
        elif node.index_key is not None:
            # the index holds one link; lower names not yet linked in the upper count
            # (so a file with no known name left may still have names rofs has not seen)
            nlink = max(1 if node.links else 0, nlink - 1 + node.nlink_delta)
        elif not node.links:
            nlink = 0
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
            if size is not None and node.is_dir:
                raise _err(errno.EISDIR)
            target, follow = self._upper_target(node, fh)
            before = self._stat(node)
            if (atime_ns is None) != (mtime_ns is None):
                atime_ns = before.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = before.st_mtime_ns if mtime_ns is None else mtime_ns
            self._set_attributes(target, follow, node, before, mode, uid, gid, size,
                                 atime_ns, mtime_ns)
            try:
                return self.getattr(node)
            except OSError as e:
                # The change is made: the reply says so (the kernel keeps what it is
                # told), from what it was and what changed.
                self._after_commit("setattr: attributes after the change: %s" % e)
                attr = self.getattr(node, before)
                for field, value in (("uid", uid), ("gid", gid), ("size", size),
                                     ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)):
                    if value is not None:
                        setattr(attr, field, value)
                if mode is not None:
                    attr.mode = stat.S_IFMT(attr.mode) | stat.S_IMODE(mode)
                return attr
        return self.getattr(node)

    @staticmethod
    def _set_attributes(target: bytes | int, follow: bool, node: Node,
                        before: os.stat_result, mode: int | None, uid: int | None,
                        gid: int | None, size: int | None, atime_ns: int | None,
                        mtime_ns: int | None) -> None:
        """One SETATTR's fields, one system call each, all or none as far as can be:
        owner and mode (which a chown of a setuid file brings together) first, restored
        if a later step fails; then the size, which cannot be undone; the times last
        (a truncate sets them)."""
        steps = []
        if uid is not None or gid is not None:
            steps.append(lambda: os.chown(target, -1 if uid is None else uid,
                                          -1 if gid is None else gid, follow_symlinks=follow))
        if mode is not None and not stat.S_ISLNK(node.mode):
            steps.append(lambda: os.chmod(target, stat.S_IMODE(mode)))
        if size is not None:
            steps.append(lambda: os.truncate(target, size))
        if atime_ns is not None:
            steps.append(lambda: os.utime(target, ns=(atime_ns, mtime_ns),
                                          follow_symlinks=follow))
        for done, step in enumerate(steps):
            try:
                step()
            except OSError:
                if done:
                    try:
                        copyup.chown(target, before.st_uid, before.st_gid,
                                     follow_symlinks=follow)
                        if not stat.S_ISLNK(before.st_mode):
                            os.chmod(target, stat.S_IMODE(before.st_mode))
                    except OSError as e:
                        log.error("setattr: owner and mode not restored after a failure: "
                                  "%s", e)
                raise

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
        if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            raise _err(errno.EINVAL)  # as setxattr(2) answers
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

    # ------------------------------------------------------------- listing

    def list_names(self, node: Node) -> list[bytes]:
        """The merged directory listing: upper names (minus whiteouts), then the lower
        names the upper does not hide."""
        return list(self._merged_names(node))

    def has_entries(self, node: Node) -> bool:
        """Whether the merged directory holds any name (rmdir's and rename's ENOTEMPTY):
        the listing is read only up to its first visible name, so a directory of any
        size costs little here unless it is all whiteouts."""
        names = self._merged_names(node)
        try:
            return next(names, None) is not None
        finally:
            names.close()

    def _names_within(self, node: Node, limit: int | None) -> list[bytes]:
        """list_names for a listing held for a user: ENOMEM as soon as it passes
        `limit` names (None: no limit), so a directory past the user's share is not
        read to its end first."""
        return _collect(self._sources(node), limit)

    def _merged_names(self, node: Node) -> Iterator[bytes]:
        """list_names's names as they are read, each layer's listing open only while
        it is being read (a caller that stops early closes the generator)."""
        return _merged(self._sources(node))

    def _sources(self, node: Node) -> list[tuple[int, Callable[[bytes], bool] | None]]:
        """What a listing of `node` reads, in order: a descriptor of each upper layer's
        directory with the test of which names are that layer's (True: all; the other
        class's layer decides its own), then the lower directory's (None).  Taken on
        the loop's thread; reading them touches nothing of the model (_merged), so it
        may run on a worker.  The descriptors are the reader's to close."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        sources: list[tuple[int, Callable[[bytes], bool] | None]] = []
        home = self._lay(node)
        base = self.path_of(node) if self.scratch_layer is not None else None
        try:
            for layer in self._layers():
                if layer is home:
                    up = self.upper_dirfd(node) if node.upper else None
                else:
                    up = self.upper_dirfd(node, layer, create=False)
                if up is None:
                    continue
                fd = os.open(reopen_listable(up), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                if base is None:
                    sources.append((fd, _ALL))
                else:
                    sources.append((fd, functools.partial(_of_layer, self._class_layer,
                                                          base, layer)))
            if node.lower is not None:
                try:
                    sources.append((self.lower.open_dir(node.lower), None))
                except (FileNotFoundError, NotADirectoryError):
                    pass
        except BaseException:
            for fd, _ in sources:
                os.close(fd)
            raise
        return sources

    def _big(self, sources: list) -> bool:
        """Whether a listing of these is worth a worker thread (BIG_DIRECTORY)."""
        return sum(os.fstat(fd).st_size for fd, _ in sources) > BIG_DIRECTORY

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
        yield from self._dots(handle.node, start, 1, 2)
        names = handle.listing.names
        for index in range(max(start - 2, 0), len(names)):
            entry = self._entry(handle.node, names[index])
            if entry is not False:
                yield index + 3, names[index], entry

    def _dots(self, node: Node, start: int, dot: int, dot_dot: int):
        """. and .. (offsets `dot` and `dot_dot`), first in every listing, as on any
        filesystem."""
        if start < dot:
            yield dot, b".", node
        if start < dot_dot:
            yield dot_dot, b"..", node.parent() or node

    def _entry(self, parent: Node, name: bytes) -> Node | None | bool:
        """The node a listed name leads to; None when it cannot be looked up (EACCES),
        False when it is gone since the listing was taken."""
        try:
            node = self.lookup(parent, name)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        return False if node is None else node

    def readdir_by_node(self, node: Node, start: int,
                        uid: int = 0) -> Iterator[tuple[int, bytes, Node | None]]:
        """Entries of directory `node` after offset `start` when the kernel opened the
        directory itself (no_open), so no handle holds a snapshot: the listing goes in
        the order of a keyed hash of each name, which is the entry's offset, so a listing
        resumed after names came and went returns no name twice and skips none that
        stayed.  (Two names with the same 61-bit hash, under a key chosen at mount, would
        hide one of them from a listing resumed between them.)  The listing is taken from
        the layers once and then kept up to date name by name as names are given to the
        directory, so a change costs no new listing of it.  A listing bigger than a
        user's share of LISTING_BUDGET is refused to users other than root (ENOMEM), as
        with handles."""
        hashed = self._hashed_listing(node, uid)
        yield from self._dots(node, start, 1, 2)
        cookies, names, added = hashed.cookies, hashed.names, hashed.added
        taken = ((cookies[k], names[k]) for k in range(bisect.bisect_right(cookies, start),
                                                          len(cookies)))
        since = added[bisect.bisect_right(added, start, key=_first):]
        for cookie, name in heapq.merge(taken, since) if since else taken:
            entry = self._entry(node, name)
            if entry is not False:
                yield cookie, name, entry

    def _cookie(self, name: bytes) -> int:
        return _cookie(self._hash_key, name)

    def _hashed_listing(self, node: Node, uid: int) -> HashedListing:
        """The merged listing of `node` ordered by offset (readdir_by_node), kept while
        no change names no directory (revert, restore), the newest HASHED_NAMES names'
        worth (at least one listing)."""
        kept = self._hashed.get(node.ino)
        if kept is not None and kept.node is node:
            self._hashed.move_to_end(node.ino)
            return kept
        return self._keep_hashed(node, *_collect_hashed(
            self._sources(node), None if uid == 0 else self.listing_budget // 4,
            self._hash_key))

    def _keep_hashed(self, node: Node, cookies: list[int], names: list[bytes]
                     ) -> HashedListing:
        hashed = HashedListing(node, cookies, names)
        kept = self._hashed.get(node.ino)
        if kept is not None:
            self._hashed_names -= len(kept)
        self._hashed[node.ino] = hashed
        self._hashed.move_to_end(node.ino)
        self._hashed_names += len(hashed)
        while self._hashed_names > HASHED_NAMES and len(self._hashed) > 1:
            _, old = self._hashed.popitem(last=False)
            self._hashed_names -= len(old)
        return hashed

    def _names_changing(self, named: list[tuple[Node, bytes]], ended: bool = False) -> None:
        """A change of names begins or ends (base._changes_names): the listings of the
        directories it names are no longer shared with new passes, and a name given to
        a directory listed by node joins that listing; a change naming no directory lets
        go of them all."""
        self.generation += 1
        if not named:
            self._listings.clear()
            self._hashed.clear()
            self._hashed_names = 0
            for changed in self._changed_while_read.values():
                changed.append(None)
            return
        for parent, name in named:
            self._listings.pop(parent.ino, None)
            changed = self._changed_while_read.get(parent.ino)
            if changed is not None:
                changed.append(name)
            if ended:
                self._hashed_add(parent, name)

    def _hashed_add(self, parent: Node, name: bytes) -> None:
        """`name` may be new in `parent`: into its listing by node, if it has one and the
        name is not there yet.  The names added are folded in once they are more than a
        sixteenth of it; when most of it is names that came and went, it is dropped, to
        be taken again at its next read."""
        hashed = self._hashed.get(parent.ino)
        if hashed is None or hashed.node is not parent:
            return
        cookie = self._cookie(name)
        cookies, names = hashed.cookies, hashed.names
        i = bisect.bisect_left(cookies, cookie)
        while i < len(cookies) and cookies[i] == cookie:
            if names[i] == name:
                return
            i += 1
        pair = (cookie, name)
        j = bisect.bisect_left(hashed.added, pair)
        if j < len(hashed.added) and hashed.added[j] == pair:
            return
        hashed.added.insert(j, pair)
        self._hashed_names += 1
        if len(hashed.added) <= FOLD_AFTER + len(names) // 16:
            return
        if len(hashed) > 2 * hashed.taken + FOLD_AFTER:
            del self._hashed[parent.ino]
            self._hashed_names -= len(hashed)
            return
        pairs = list(heapq.merge(zip(cookies, names, strict=True), hashed.added))
        hashed.cookies, hashed.names = [c for c, _ in pairs], [n for _, n in pairs]
        hashed.added = []

    def _take_listing(self, handle: DirHandle, names: list[bytes] | None = None,
                      share: bool = True) -> None:
        """Give the handle the directory's shared listing, or a new one: `names` read
        already (read_listing), or read now.  `share`: whether later passes may share
        it (not when names changed while it was read)."""
        node = handle.node
        listing = self._listings.get(node.ino) if names is None else None
        if listing is None or listing.node is not node:
            uid = handle.uid
            limit = self._handle_limit(uid)
            if names is None:
                names = self._names_within(node, limit)
            elif limit is not None and len(names) > limit:
                raise _err(errno.ENOMEM)  # others' listings took the share meanwhile
            listing = Listing(node, tuple(names), uid)
            if share:
                self._listings[node.ino] = listing
            self.listed_names += len(names)
            self._listed_by_uid[uid] += len(names)
        listing.users += 1  # first: the handle may hold this very listing already
        self._drop_listing(handle)
        handle.listing = listing

    def _handle_limit(self, uid: int) -> int | None:
        """The most names a new listing held for `uid` may have (None: root's)."""
        if uid == 0:
            return None
        return min(self.listing_budget - self.listed_names,
                   self.listing_budget // 4 - self._listed_by_uid[uid])

    def listing_to_read(self, dh: int, node: Node | None, start: int) -> bool:
        """Whether a READDIR (of handle `dh`, or of `node` by node) needs a listing read
        from the layers first: then await read_listing before readdir/readdir_by_node."""
        if dh:
            handle = self.dirs.get(dh)
            if handle is None or not (handle.listing is None or
                                      (start == 0 and handle.served)):
                return False
            shared = self._listings.get(handle.node.ino)
            return shared is None or shared.node is not handle.node
        kept = self._hashed.get(node.ino)
        return kept is None or kept.node is not node

    async def read_listing(self, dh: int, node: Node | None, start: int, uid: int) -> None:
        """Read the listing a READDIR needs (listing_to_read), on a worker thread when
        the directory is big (BIG_DIRECTORY), so the loop goes on serving others: its
        names, and for a listing by node their offsets, in order.  One read of a
        directory at a time: a READDIR arriving meanwhile waits for it and takes its
        listing where it may.  Names given to or taken from the directory meanwhile
        are caught up with."""
        handle = self.dirs[dh] if dh else None
        if handle is not None:
            node = handle.node
        while (reading := self._scanning.get(node.ino)) is not None:
            await reading.wait()
        if not self.listing_to_read(dh, node, start) or \
                (handle is not None and self.dirs.get(dh) is not handle):
            return
        if handle is not None:
            limit = self._handle_limit(handle.uid)
            read, args = _collect, ()
        else:
            limit = None if uid == 0 else self.listing_budget // 4
            read, args = _collect_hashed, (self._hash_key,)
        sources = self._sources(node)
        changed: list = []
        self._changed_while_read[node.ino] = changed
        self._scanning[node.ino] = reading = self.loop.event()
        try:
            if self._big(sources):
                found = await self.loop.offload(_read_on_worker, read, sources, limit, *args)
            else:
                found = read(sources, limit, *args)
        finally:
            del self._changed_while_read[node.ino]
            del self._scanning[node.ino]
            reading.set()
        if handle is not None:
            if self.dirs.get(dh) is not handle:
                return  # released meanwhile
            self._take_listing(handle, found, share=not changed)
            handle.served = False  # a listing for this pass: readdir takes no other
        elif None not in changed and node.is_dir:
            self._keep_hashed(node, *found)
            for name in changed:
                self._hashed_add(node, name)

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
            await self.loop.offload(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)
