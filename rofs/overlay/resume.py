"""Taking over from a server that died: the node ids, file handles and directory
handles the kernel still holds, answered from the journal (rofs/store/journal.py)
the first time the kernel names each."""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat

from rofs.overlay.base import DirHandle, FileHandle, OpenFile, _err
from rofs.store.inodes import UPPER_TAG, Node
from rofs.store.journal import FH_FD_BITS, Entry, Journal, handle_fd
from rofs.store.layers import getxattr_or_none

log = logging.getLogger(__name__)

# The kernel's references to a node the dead server gave it are not known (the journal
# does not count lookups): a node found again keeps this many, so it is never let go of
# while the kernel may hold it (at most what the kernel held when the server died).
RESUMED_LOOKUPS = 1 << 40
# Handles of each server start here times its number, so a new handle never repeats
# one the kernel holds from a dead server.
HANDLE_SPAN = 1 << 26


class Resume:
    """Overlay's side of the journal (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

    def attach_journal(self, journal: Journal, serial: int,
                       survivors: dict[int, tuple[int, int]] | None = None) -> None:
        """Journal every name, handle and kept object from now on.  `serial`: how many
        servers of this mount came before; with `survivors` (descriptor -> (node id,
        handles) as the journal had them, the descriptors a dead server left open), the
        node ids and handles the kernel holds are found again as it names them."""
        self.journal = journal
        self.table.journal = journal
        journal.source = self._live_names
        self._fhs = itertools.count(serial * HANDLE_SPAN + 1)
        self._dir_ids = itertools.count(serial * HANDLE_SPAN + 1)
        self._first_own_handle = serial * HANDLE_SPAN + 1  # (file handles: >> FH_FD_BITS)
        self._resumable: dict[int, Entry] = journal.replay() if survivors is not None \
            else {}
        self._survivors = dict(survivors or {})
        # A descriptor of each node id's object: the one it kept (no handles) if any.
        self._kept_by_ino: dict[int, int] = {
            ino: fd for fd, (ino, handles) in sorted(self._survivors.items(),
                                                     key=lambda item: -item[1][1])}
        journal.rewrite()  # the log from here on: what this server knows, whole

    def _live_names(self):
        """Every name the journal must keep: of the table's nodes, and of node ids the
        kernel may hold that this server has not been asked about yet."""
        for node in list(self.table.nodes.values()):
            for parent, name in node.links:
                yield node.ino, node.generation, parent.ino, name
            if not node.links:
                yield node.ino, node.generation, 0, b""
        for ino, entry in list(self._resumable.items()):
            for parent, name in entry.links:
                yield ino, entry.generation, parent, name
            if not entry.links:
                yield ino, entry.generation, 0, b""

    # ------------------------------------------------------------------ nodes

    def resume_node(self, ino: int, depth: int = 0) -> Node:
        """The node for an id the kernel holds from a dead server (ESTALE: unknown)."""
        entry = self._resumable.get(ino)
        if entry is None or depth > 4096:
            log.warning("node id %d, which the kernel names, is not in the journal: "
                        "ESTALE", ino)
            raise _err(errno.ESTALE)
        for parent_ino, name in list(entry.links):
            parent = self.table.get(parent_ino)
            try:
                if parent is None:
                    parent = self.resume_node(parent_ino, depth + 1)
                node = self.lookup(parent, name)
            except OSError:
                continue
            if node is not None and node.ino == ino:
                # (lookup adopts what it meets: nothing left to do then)
                return self._adopt(node, entry) if ino in self._resumable else node
        fd = self._kept_by_ino.get(ino)
        if fd is not None:
            return self._adopt(self._nameless(ino, fd), entry)
        self._resumable.pop(ino, None)
        log.warning("node id %d is not found again under any of its names %r: ESTALE",
                    ino, entry.links)
        raise _err(errno.ESTALE)

    def moved_before(self, src: Node, old: bytes, dst: Node, new: bytes) -> None:
        """A rename the dead server made on disk and did not answer (nor perhaps
        journal): the node ids it named answer to their new names."""
        for ino, entry in list(self._resumable.items()):
            if (dst.ino, new) in entry.links:  # the one it replaced
                entry.links.remove((dst.ino, new))
                self.journal.unlink(ino, dst.ino, new)
            if (src.ino, old) in entry.links:
                entry.links[entry.links.index((src.ino, old))] = (dst.ino, new)
                self.journal.unlink(ino, src.ino, old)
                self.journal.link(ino, entry.generation, dst.ino, new)

    def forget_resumable(self, ino: int) -> None:
        """The kernel let go of a node id of a dead server's, never named since."""
        entry = self._resumable.pop(ino, None)
        if entry is not None:
            self.journal.drop(ino, len(entry.links))

    def _adopt(self, node: Node, entry: Entry) -> Node:
        del self._resumable[node.ino]
        if node.lookups < RESUMED_LOOKUPS // 2 and node.generation != entry.generation:
            node.generation = entry.generation
            for parent, name in node.links:  # again, with the generation the kernel has
                self.journal.link(node.ino, node.generation, parent.ino, name)
        if not node.links:
            self.journal.link(node.ino, node.generation, 0, b"")
        node.lookups += RESUMED_LOOKUPS
        fd = self._kept_by_ino.pop(node.ino, None)
        if fd is not None and self._survivors.get(fd, (0, 1))[1] == 0:
            # The object the dead server kept of it (no handle uses that descriptor).
            del self._survivors[fd]
            if node.keep_fd < 0:
                self.table.set_keep_fd(node, fd)
            else:
                self.journal.let_go(fd)
                os.close(fd)
        return node

    def _nameless(self, ino: int, fd: int) -> Node:
        """A node whose last name went while the kernel held it, from a descriptor the
        dead server kept of it."""
        st = os.fstat(fd)
        # An upper object: on another filesystem, or numbered as one, or a copy (which
        # records the number it had below).
        upper = st.st_dev != self.lower.dev or UPPER_TAG <= ino or getxattr_or_none(
            b"/proc/self/fd/%d" % fd, self.markers.ino) is not None
        node = Node(ino, stat.S_IFMT(st.st_mode), upper=upper, lower=None,
                    backing=("U" if upper else "L", st.st_dev, st.st_ino))
        if self._survivors[fd][1]:  # a handle's: kept apart from it
            self.table.set_keep_fd(node, os.open("/proc/self/fd/%d" % fd,
                                                 os.O_PATH | os.O_CLOEXEC))
        self.table.add_root(node)
        return node

    # ---------------------------------------------------------------- handles

    def resume_handle(self, fh: int) -> FileHandle:
        """The handle for an fh the kernel holds from a dead server (EBADF: unknown)."""
        fd = handle_fd(fh)
        survivor = self._survivors.get(fd)
        if survivor is None or fh >> FH_FD_BITS >= self._first_own_handle:
            raise _err(errno.EBADF)
        ino, users = survivor
        node = self.table.get(ino) or self.resume_node(ino)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        file = self._open_files.get(fd)
        if file is None:
            # Counted with all the kernel's handles of it, named yet or not: each
            # release takes one away.
            file = OpenFile(fd, not node.upper, False, 0,
                            flags & os.O_ACCMODE != os.O_RDONLY)
            file.users = file.handed = users
            self._open_files[fd] = file
            self._fds_by_uid[0] += 1
            if not node.open_fds:
                node.open_fds = set()
            node.open_fds.add(fd)
        handle = FileHandle(fh, file, node, flags, 0, 0)
        handle.handed = True
        self.files[fh] = handle
        return handle

    def resume_dir(self, dh: int, node: Node) -> None:
        """A directory handle the kernel holds from a dead server: its listing is taken
        anew (names changed meanwhile may be skipped or seen twice, as over NFS)."""
        if dh not in self.dirs and dh < self._first_own_handle:
            if not node.is_dir:
                raise _err(errno.EBADF)
            self.dirs[dh] = DirHandle(node, 0)
