"""Rename: within a layer (redirects, opaque markers, whiteouts) and across classes."""

from __future__ import annotations

import errno
import logging
import os
import stat

from rofs import crash
from rofs._sys import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, proc_path, renameat2
from rofs.overlay.base import INLINE_COPY, _changes_names, _err, _signature
from rofs.store import copyup
from rofs.store.inodes import Node
from rofs.store.layers import UpperLayer, is_whiteout, open_listable

log = logging.getLogger(__name__)


class Renames:
    """Overlay's rename (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

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
        synced = carried = False
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
            if not exchange and dst is not None and dst.is_dir and self.has_entries(dst):
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
            if not synced:  # the data of the files that get a new name: see durable.py
                synced = True
                for node, parent, name in ((src, src_parent, src_name),
                                           (dst, dst_parent, dst_name) if exchange else
                                           (None, None, None)):
                    if node is not None and stat.S_ISREG(node.mode) and \
                            self._lay(node) is self.upper:
                        await self._sync_data(self.upper_dirfd(parent, self.upper), name,
                                              node)
                continue
            if not carried:
                carried = True
                if not exchange and dst is not None and not dst.is_dir and \
                        stat.S_ISREG(src.mode) and layer is self.upper and \
                        self._lay(src) is layer and await self._carry_origin(
                            src_parent, src_name, dst, dst_parent, dst_name):
                    continue  # (it read the lower file: the world may have changed)
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
            self._entries_changed(layer, sup)
            self._entries_changed(layer, dup)
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
        crash.point("rename:done")
        self._entries_changed(layer, sup)
        self._entries_changed(layer, dup)
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

    async def _carry_origin(self, src_parent: Node, src_name: bytes, dst: Node,
                            dst_parent: Node, dst_name: bytes) -> bool:
        """A new file about to replace one the image has (sed -i, shadow-utils' passwd+
        over passwd): it gets the origin of what it replaces (that copy's, or the lower
        object's), so an image update merges it with the image's new version instead of
        calling it unknown (docs/image-updates.md).  A file that has an origin of its
        own (a copy moved here) keeps it: a change made here.  Returns whether it
        awaited (read the lower file)."""
        sup = self.upper_dirfd(src_parent, self.upper)
        awaited = False
        try:
            st = self.upper.try_stat(sup, src_name)
            if st is None or st.st_nlink != 1 or \
                    self.upper.get_marker(sup, src_name, self.markers.origin) is not None:
                return False
            if dst.upper:
                dup = self.upper_dirfd(dst_parent, self.upper)
                value = self.upper.get_marker(dup, dst_name, self.markers.origin)
            elif dst.lower is not None:
                lst = self.lower.try_stat(dst.lower)
                awaited = lst is not None
                value = await self._origin(dst, lst) if lst is not None else None
            else:
                value = None
            if value is not None:
                self.upper.set_marker(sup, src_name, self.markers.origin, value)
        except OSError as e:  # bookkeeping for image updates: the file is then unknown
            log.warning("rename of %r: its origin is not recorded: %s", src_name, e.strerror)
        return awaited

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
                await self.loop.offload(copyup.copy_data, fd_in, fd_out, st.st_size)
                await self.loop.offload(os.fsync, fd_out)
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
        self._entries_changed(layer, dup)
        crash.point("rename:across-placed")
        try:
            self._remove_source(old, sup, src_parent, src_name)
        except OSError as e:
            self._after_commit("rename of %r to %r across classes: the source name stays: "
                               "%s" % (src_name, dst_name, e))
        if dst is not None:
            self.table.remove_link(dst, dst_parent, dst_name)
        self.table.move_link(src, src_parent, src_name, dst_parent, dst_name)
        # The kernel's own opens (no_open) reach the file at its new place from now on.
        self._drop_node_handle(src)
        src.layer = None if layer is self.upper else layer
        self.table.rebind(src, (layer.tag, new.st_dev, new.st_ino))

    def _remove_source(self, layer: UpperLayer, up: int, parent: Node, name: bytes) -> None:
        """Remove the name of a file moved to the other layer, leaving a whiteout if the
        lower has something under that name."""
        if not self._lower_has(parent, name):
            os.unlink(name, dir_fd=up)
            self._entries_changed(layer, up)
            return
        tmp = layer.temp_name()
        layer.make_whiteout(layer.work_fd, tmp)
        try:
            renameat2(layer.work_fd, tmp, up, name, 0)
        except BaseException:
            self._discard(tmp, layer)
            raise
        self._entries_changed(layer, up)

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
        if node.lower is not None and node.lower != natural:
            layer.set_marker(old_parent_fd, old_name, self.markers.redirect,
                             b"/" + b"/".join(node.lower))
        elif node.lower is None and natural is not None and natural != ():
            layer.set_marker(old_parent_fd, old_name, self.markers.opaque, b"y")
        else:
            return
        self._moved_dir_marked(layer, old_parent_fd, old_name)
        crash.point("rename:marked")

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
