"""Namespace changes: new entries, links, removal, revert."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat

from rofs import crash
from rofs._sys import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from rofs.overlay.base import FileHandle, _changes_names, _err
from rofs.store import acl, copyup, index, origin
from rofs.store.inodes import Node
from rofs.store.layers import UpperLayer, is_whiteout, open_listable

log = logging.getLogger(__name__)


class Names:
    """Overlay's namespace changes (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

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
        (see rofs.store.acl)."""
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

    def _own(self, path: bytes, uid: int, gid: int, mode: int,
             acls: dict[bytes, bytes]) -> None:
        """Give a new entry in the work dir its owner, mode and ACLs (new_entry's)."""
        copyup.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, stat.S_IMODE(mode))
        self._set_acls(path, acls)

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
                self._hidden_origin(layer, tmp, parent, name)
            st = os.stat(tmp, dir_fd=work, follow_symlinks=False)  # (rename keeps it)
            crash.point("create:prepared")
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
        self._entries_changed(layer, up)
        if over_whiteout and is_dir:
            crash.point("mkdir:swapped")
            try:
                os.unlink(tmp, dir_fd=work)  # the whiteout, swapped out
            except OSError as e:  # left in the work dir, which the next mount empties
                self._after_commit("mkdir of %r: %s" % (name, e))
        node = self.table.find_or_add(parent, name, st.st_mode, upper=True, lower=None,
                                      backing=(layer.tag, st.st_dev, st.st_ino))
        node.layer = None if layer is self.upper else layer
        node.prot = 0  # new: no inode flags
        return node

    def _mark_deleted(self, layer: UpperLayer, dir_fd: int, whiteout: bytes, parent: Node,
                      name: bytes) -> None:
        """Give a whiteout of the persistent layer the origin of the lower object it
        hides (metadata only: no content is read to delete a file), so that an image
        that changes it later is noticed (docs/image-updates.md).  Only where a device
        can carry the marker (trusted.*, not user.*); never fails the deletion."""
        if layer is not self.upper or parent.lower is None or \
                not self.markers.prefix.startswith(b"trusted."):
            return
        path = parent.lower + (name,)
        try:
            st = self.lower.try_stat(path)
            if st is not None:
                layer.set_marker(dir_fd, whiteout, self.markers.origin,
                                 origin.of(st, origin.UNKNOWN, origin.UNKNOWN, path).encode())
        except OSError as e:  # (after the commit point of an unlink of a lower file)
            log.warning("deletion of %r: what it hides is not recorded: %s", name,
                        e.strerror)

    def _hidden_origin(self, layer: UpperLayer, tmp: bytes, parent: Node,
                       name: bytes) -> None:
        """Give the opaque directory work/tmp, about to replace the lower directory
        parent/name, that directory's origin, its listing kept in the base store, so
        that entries a new image adds there can be told apart (docs/image-updates.md).
        Nothing when there is no such lower directory; never fails the mkdir."""
        if parent.lower is None or self.base_writer is None:
            return
        path = parent.lower + (name,)
        try:
            st = self.lower.try_stat(path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return
            where = self.lower.xattr_path(path)
            found = origin.listed(os.listdir(where))
            if found is None:
                return  # (too long to keep: what it hides stays unknown)
            self.base_writer.add(*found)
            layer.set_marker(layer.work_fd, tmp, self.markers.origin, origin.of(
                st, found[0], origin.xattrs_digest(where, self.markers.is_private),
                path).encode())
        except OSError as e:
            log.warning("mkdir of %r: what it hides is not recorded: %s", name, e.strerror)

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
            self._own(layer.work_path(tmp), uid, gid, mode, acls)

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
            self._own(layer.work_path(tmp), uid, gid, mode, acls)

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
        self._entries_changed(layer, up)
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
            self.table.set_keep_fd(node, os.open(
                name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self.upper_dirfd(parent, self._lay(node))))

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
        if self.has_entries(node):
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
        self._remove_upper_entry(parent, name, node, layer, up)
        self._entries_changed(layer, up)
        if node.is_dir:
            # After the removal, which can fail: the mirror holds the whiteouts of the
            # other class's deleted entries, which would come back with the directory.
            try:
                self._drop_mirrors(parent, name, layer)
            except OSError as e:
                self._after_commit("rmdir of %r: its entries of the other class stay: %s"
                                   % (name, e))

    def _remove_upper_entry(self, parent: Node, name: bytes, node: Node,
                            layer: UpperLayer, up: int) -> None:
        """_remove_entry's change in `layer`, whose directory `up` holds `name`."""
        work = layer.work_fd
        if not node.upper:  # shown from the lower layer, so the lower has the name
            layer.make_whiteout(up, name)
            self._mark_deleted(layer, up, name, parent, name)
            return
        if self._lower_has(parent, name):
            tmp = layer.temp_name()
            layer.make_whiteout(work, tmp)
            self._mark_deleted(layer, work, tmp, parent, name)
            crash.point("whiteout:prepared")
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
                index.detach(layer, up, name)
                self._entries_changed(layer, up)

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
        index.detach(layer, up, name)
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
        """Put an entry set aside (rofs.store.attic) back at `path` in the persistent upper
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
        index.relink_index(self.upper, up, name)
        self._unname(affected)
        return parent.ino, name
