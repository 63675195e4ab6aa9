"""Lookup and the view: nodes, attributes, xattrs (listings: rofs.overlay.listings)."""

from __future__ import annotations

import errno
import logging
import os
import stat

from rofs import crash
from rofs._sys import malloc_trim, proc_path
from rofs.overlay.base import (
    NAME_MAX,
    Attr,
    _err,
    _index_key,
    _parse_ino,
    _parse_int,
    _truncate,
)
from rofs.store import acl, copyup
from rofs.store.closer import KEPT
from rofs.store.inodes import Node
from rofs.store.layers import (
    UpperLayer,
    getxattr_or_none,
    is_whiteout,
    open_dir_fd,
)

log = logging.getLogger(__name__)

class View:
    """Overlay's lookup and the view (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

    # ------------------------------------------------------------------ nodes

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            if self._resumable:
                return self.resume_node(ino)
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
        node = self._resolve(parent, name)
        if self._resumable and node is not None and node.ino in self._resumable:
            # A node id the kernel holds from a dead server, met by a name first: the
            # kernel's references to it are kept (it must not go when this server's
            # own count falls to 0).
            node = self._adopt(node, self._resumable[node.ino])
        return node

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
            if self._resumable:
                self.forget_resumable(ino)
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
            own = None
            if size is not None:
                # The truncate waits on a worker while other requests run: every step
                # goes through a descriptor of this setattr's own, so a rename, a
                # release or the directory cache meanwhile cannot turn a path or a
                # descriptor number into another file's.
                own = os.dup(target) if isinstance(target, int) else os.open(
                    target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC |
                    (0 if follow else os.O_NOFOLLOW))  # (follow: a /proc/self/fd link)
                target, follow = own, True
            try:
                await self._set_attributes(target, follow, node, before, mode, uid, gid,
                                           size, atime_ns, mtime_ns)
            finally:
                if own is not None:
                    self.closer.close(own, KEPT)  # written: its close may wait too
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

    async def _set_attributes(self, target: bytes | int, follow: bool, node: Node,
                              before: os.stat_result, mode: int | None, uid: int | None,
                              gid: int | None, size: int | None, atime_ns: int | None,
                              mtime_ns: int | None) -> None:
        """One SETATTR's fields, one system call each, all or none as far as can be:
        owner and mode (which a chown of a setuid file brings together) first, restored
        if a later step fails; then the size, which cannot be undone (on a worker: it
        waits for the pages the disk is writing); the times last (a truncate sets
        them)."""
        steps = []
        if uid is not None or gid is not None:
            steps.append(lambda: os.chown(target, -1 if uid is None else uid,
                                          -1 if gid is None else gid, follow_symlinks=follow))
        if mode is not None and not stat.S_ISLNK(node.mode):
            steps.append(lambda: os.chmod(target, stat.S_IMODE(mode)))
        if size is not None:
            steps.append(lambda: self.loop.offload(_truncate, target, size))
        if atime_ns is not None:
            steps.append(lambda: os.utime(target, ns=(atime_ns, mtime_ns),
                                          follow_symlinks=follow))
        for done, step in enumerate(steps):
            try:
                waiting = step()
                if waiting is not None:
                    await waiting
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

    async def fsyncdir(self, node: Node, datasync: bool) -> None:
        if not node.upper:
            return
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.upper_dirfd(node))
        try:
            await self.loop.offload(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)
