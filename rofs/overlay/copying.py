"""Copy-up: a lower object's copy made complete in the work dir, then renamed into place."""

from __future__ import annotations

import errno
import logging
import os
import stat

from rofs import crash
from rofs._sys import FS_APPEND_FL, FS_IMMUTABLE_FL, RENAME_NOREPLACE, add_inode_flags, renameat2
from rofs.overlay.base import COPIED_FLAGS, INLINE_COPY, PROTECTION_FLAGS, _err, _index_key
from rofs.store import copyup, origin
from rofs.store.inodes import Node
from rofs.store.layers import UpperLayer

log = logging.getLogger(__name__)


class CopyUp:
    """Overlay's copy-up (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

    # ---------------------------------------------------------------- copy-up

    async def copy_up(self, node: Node, *, data_limit: int | None = None,
                      keep: bool = False) -> int | None:
        """Give `node` (and its parents) an upper copy, once, atomically.

        `data_limit` bounds the bytes copied (a truncate or O_TRUNC needs fewer or none).
        `keep`: return a read-write descriptor of a regular file's copy, opened before it
        was renamed into place (an O_TRUNC open's: once the empty copy is in place, its
        open cannot fail), or None if another request made the copy.
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
            done = self.loop.event()
            self._copying[node.ino] = done
            try:
                return await self._copy_up_file(node, data_limit, keep)
            finally:
                del self._copying[node.ino]
                done.set()
        return None

    async def copy_up_unlinked(self, node: Node) -> None:
        """The copy-up of a lower file removed while open (with no_open rofs does not see
        opens, so the first write may come after the unlink): a copy with no name, made
        in the work dir and unlinked there, which the node holds (keep_fd) as an open
        unlinked upper file."""
        st = self.lower.stat(node.lower)
        if not stat.S_ISREG(st.st_mode):
            raise _err(errno.ENOENT)
        layer = self._lay(node)
        tmp = layer.temp_name()
        flags = self._lower_flags(node)
        try:
            await self._copy_regular(node, st, tmp, None, {}, layer, flags & COPIED_FLAGS)
            keep = os.open(tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=layer.work_fd)
        finally:
            self._discard(tmp, layer)
        if node.upper or node.links:  # copied (or linked) meanwhile
            os.close(keep)
            return
        new = os.fstat(keep)
        self.table.set_keep_fd(node, keep)
        node.upper = True
        self.table.rebind(node, (layer.tag, new.st_dev, new.st_ino))
        self._repoint_readers(node)

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
            lower = self.lower.xattr_path(node.lower)
            copyup.copy_meta(st, layer.work_path(tmp), self.markers.is_private, lower,
                             extra={self.markers.ino: b"%d" % node.ino,
                                    self.markers.origin: origin.of(
                                        st, origin.UNKNOWN, origin.xattrs_digest(
                                            lower, self.markers.is_private),
                                        node.lower).encode(),
                                    **self._protattr(flags)})
            if flags & COPIED_FLAGS:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work)
                try:
                    add_inode_flags(fd, flags & COPIED_FLAGS)
                finally:
                    os.close(fd)
            new = os.stat(tmp, dir_fd=work, follow_symlinks=False)
            up = self.upper_dirfd(parent, layer)
            renameat2(work, tmp, up, name, RENAME_NOREPLACE)
        except BaseException:
            self._discard(tmp, layer)
            raise
        self._entries_changed(layer, up)
        node.upper = True
        self.table.rebind(node, (layer.tag, new.st_dev, new.st_ino))

    async def _origin(self, node: Node, st: os.stat_result) -> bytes:
        """The origin marker of a copy-up of `node` (rofs/store/origin.py): its lower object's
        metadata, content digest (read in a worker thread past BASE_LIMIT; a text file
        up to it is kept in the base store) and xattrs."""
        private = self.markers.is_private
        if not stat.S_ISREG(st.st_mode):
            path = self.lower.xattr_path(node.lower)
            return origin.of(st, origin.content_digest(st, path),
                             origin.xattrs_digest(path, private), node.lower).encode()
        fd = self.lower.open(node.lower)
        try:
            if st.st_size > origin.BASE_LIMIT:
                found, data = await self.loop.offload(origin.of_regular, fd, st, node.lower,
                                                      private)
            else:
                found, data = origin.of_regular(fd, st, node.lower, private)
        finally:
            os.close(fd)
        if data is not None and self.base_writer is not None:
            self.base_writer.add(found.content, data)  # (off the request path)
        return found.encode()

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

    async def _copy_up_file(self, node: Node, data_limit: int | None,
                            keep: bool = False) -> int | None:
        st = self.lower.stat(node.lower)
        layer = self._lay(node)
        work = layer.work_fd
        tmp = layer.temp_name()
        # A lower hard link also goes to the index, so that its lower names not known yet
        # find this copy when they are looked up (like overlayfs index=on).
        index = layer.index_fd
        key = _index_key(st) if st.st_nlink > 1 and index is not None else None
        extra = {self.markers.ino: b"%d %s" % (node.ino, key) if key else b"%d" % node.ino,
                 self.markers.origin: await self._origin(node, st)}
        indexed = False
        kept = None
        try:
            if stat.S_ISREG(st.st_mode):
                flags = self._lower_flags(node)
                extra.update(self._protattr(flags))
                kept = await self._copy_regular(node, st, tmp, data_limit, extra, layer,
                                                flags & COPIED_FLAGS, keep)
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
            # The other names of a hard link that will join this copy: those known (in
            # this layer: a link cannot cross layers), linked right after the rename,
            # and those not known yet, linked when looked up (_materialize).  The index
            # counts both, so a crash before the known ones are linked splits nothing.
            others = [(p, n) for p, n in links[1:] if self.layer_for(p, n) is layer]
            pending = st.st_nlink - len(links) + len(others)
            if key is not None and pending > 0:
                layer.set_marker(work, tmp, self.markers.nlink, b"%d" % pending)
                try:
                    os.link(tmp, key, src_dir_fd=work, dst_dir_fd=index)
                except FileExistsError:  # left by a crash: the new copy replaces it
                    os.unlink(key, dir_fd=index)
                    os.link(tmp, key, src_dir_fd=work, dst_dir_fd=index)
                indexed = True
                self._entries_changed(layer, index)
            crash.point("copy-up:prepared")
            up = self.upper_dirfd(first_parent, layer)
            renameat2(work, tmp, up, first_name, RENAME_NOREPLACE)
        except BaseException:
            if kept is not None:
                os.close(kept)
            if indexed:
                os.unlink(key, dir_fd=index)
            self._discard(tmp, layer)
            raise
        # The commit point: the copy is in place.  From here on nothing raises (memory and
        # disk would disagree, and a retry would find the name taken); what fails is
        # logged and counted.
        self._entries_changed(layer, up)
        crash.point("copy-up:placed")
        if indexed:
            node.index_key, node.nlink_delta = key, pending
        node.upper = True
        try:
            new = os.stat(first_name, dir_fd=self.upper_dirfd(first_parent, layer),
                          follow_symlinks=False)
            self.table.rebind(node, (layer.tag, new.st_dev, new.st_ino))
        except OSError as e:
            self._after_commit("copy-up of %r: stat: %s" % (first_name, e))
        # Lower hard links known under several names stay one inode: link them all.
        for parent, name in others:
            try:
                up = self.upper_dirfd(parent, layer)
                os.link(first_name, name, src_dir_fd=self.upper_dirfd(first_parent, layer),
                        dst_dir_fd=up, follow_symlinks=False)
                self._entries_changed(layer, up)
                crash.point("copy-up:linked")
                if indexed:
                    self._index_linked(key, layer, node)
            except OSError as e:
                self._after_commit("copy-up of %r: its name %r is linked to it at its "
                                   "first lookup after a remount: %s" % (first_name, name, e))
        try:
            self._repoint_readers(node)
        except OSError as e:
            self._after_commit("copy-up of %r: open readers: %s" % (first_name, e))
        return kept

    def _after_commit(self, message: str) -> None:
        """A failure after a change was committed to disk: the change stands."""
        self.failures_after_commit += 1
        log.error("%s (the change itself is done)", message)

    async def _copy_regular(self, node: Node, st: os.stat_result, tmp: bytes,
                            data_limit: int | None, extra: dict[bytes, bytes],
                            layer: UpperLayer, flags: int, keep: bool = False) -> int | None:
        """The copy of a regular file, made in the work dir; its descriptor if `keep`."""
        size = st.st_size if data_limit is None else min(st.st_size, data_limit)
        src = self.lower.open(node.lower) if size else -1
        try:
            dst = os.open(tmp, (os.O_RDWR if keep else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
                          | os.O_CLOEXEC, 0o600, dir_fd=layer.work_fd)
            try:
                if size > INLINE_COPY:
                    await self.loop.offload(copyup.copy_data, src, dst, size)
                elif size:
                    copyup.copy_data(src, dst, size)
                # Metadata after the data: writing drops file capabilities.
                copyup.copy_meta(st, dst, self.markers.is_private,
                                 self.lower.xattr_path(node.lower), extra=extra)
                if flags:
                    add_inode_flags(dst, flags)
                await self.loop.offload(os.fsync, dst)
            except BaseException:
                os.close(dst)
                raise
            if not keep:
                os.close(dst)
                dst = None
        finally:
            if src >= 0:
                os.close(src)
        return dst

    def _repoint_readers(self, node: Node) -> None:
        """Read-only handles opened before the copy-up now read the upper copy (an idle
        descriptor is closed instead)."""
        if id(node) in self._idle:
            self._close_idle(id(node))
        for fd in node.open_fds:
            file = self._open_files.get(fd)
            if file is None or not file.on_lower:
                continue
            if node.links:
                parent, name = node.links[0]
                new = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=self.upper_dirfd(parent, self._lay(node)))
            else:  # a copy with no name (copy_up_unlinked)
                new = os.open(b"/proc/self/fd/%d" % node.keep_fd, os.O_RDONLY | os.O_CLOEXEC)
            os.dup2(new, fd, inheritable=False)
            os.close(new)
            file.on_lower = False

    def _discard(self, tmp: bytes, layer: UpperLayer | None = None) -> None:
        layer = layer or self.upper
        try:
            layer.remove_tree(layer.work_fd, tmp)
        except OSError as e:
            log.warning("could not remove work file %r: %s", tmp, e)
