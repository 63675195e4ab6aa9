"""The inode table: merged-view nodes, their names, and the lookup cache.

A `Node` is one inode of the merged view.  It knows where its data lives (`upper`
and/or `lower`), its names (`links`: (parent node, name) pairs) and how many references
the kernel holds (`lookups`).  `NodeTable.dentries` maps (parent inode, name) to the
node for every name of every live node: a repeated lookup is one dict access.

Inode numbers are stable for the life of the mount and, for everything on the two
layers' primary filesystems, across remounts:
- an object of the lower layer's filesystem shows its own st_ino;
- an object that exists only in the upper layer shows st_ino | UPPER_TAG;
- a copied-up object keeps the number it had before (the upper copy records it in the
  `rofs.ino` marker);
- anything else (another filesystem mounted inside a layer, inode numbers too large to
  tag) gets a number from a dynamic range, stable while the kernel remembers it.
Two live nodes never share a number: a candidate already taken by a different backing
object falls back to the dynamic range.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Callable

ROOT_INO = 1
UPPER_TAG = 1 << 48
DYNAMIC_BASE = 1 << 49
# Shared by every node without open files (most of them): an empty set costs 216 bytes.
NO_FDS: frozenset[int] = frozenset()
# The tables are rebuilt when they shrink below a quarter of their largest size (Python
# dicts never give memory back on deletion), once they have held this many entries.
SHRINK_MIN = 4096


class Node:
    __slots__ = ("ino", "mode", "links", "lower", "upper", "lookups", "backing",
                 "open_fds", "kids", "index_key", "nlink_delta", "target", "generation", "keep_fd",
                 "layer", "prot")

    def __init__(self, ino: int, mode: int, *, upper: bool,
                 lower: tuple[bytes, ...] | None, backing: tuple) -> None:
        self.ino = ino
        self.mode = mode  # the S_IFMT bits; a node never changes type
        self.links: list[tuple[Node, bytes]] = []
        # For a directory: the lower directory merged into it (None when opaque or
        # absent).  For anything else: the lower object holding its data while it is
        # not (yet) in the upper layer.
        self.lower = lower
        self.upper = upper
        self.lookups = 0
        # What the inode number belongs to: ("U" or "L", st_dev, st_ino).
        self.backing = backing
        # Descriptors of this node's open files, so an unlinked file stays reachable.
        self.open_fds: set[int] | frozenset[int] = NO_FDS
        # How many names of live nodes are in this directory: a directory stays in the
        # table while its children do, so there is only ever one node per directory.
        self.kids = 0
        # A copied-up lower hard link some of whose lower names are not yet in the upper
        # layer: its entry in the index dir, and how many such names there are.
        self.index_key: bytes | None = None
        self.nlink_delta = 0
        # A symlink's target, once read: it never changes, and the kernel may still ask
        # for it after another process removed the link (a path walk racing unlink).
        self.target: bytes | None = None
        # FUSE identifies an inode by (number, generation): a number given to a new
        # object while the kernel may still cache the old one gets a new generation.
        self.generation = 0
        # An O_PATH descriptor of the object once its last name is gone while the kernel
        # still holds it (an open FIFO, a cwd, a cached inode): fstat keeps working.
        self.keep_fd = -1
        # The upper layer this node's changes go to (None: the persistent one; the
        # scratch layer for paths of the scratch class, see rofs.overlay).
        self.layer = None
        # Its FS_IMMUTABLE_FL | FS_APPEND_FL, once asked (-1: not yet; Overlay.protection).
        self.prot = -1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def primary_link(self) -> tuple[Node, bytes]:
        return self.links[0]

    def parent(self) -> Node | None:
        return self.links[0][0] if self.links else None

    def __repr__(self) -> str:
        names = [name for _, name in self.links]
        return "<Node %d %o upper=%s lower=%r names=%r>" % (
            self.ino, self.mode, self.upper, self.lower, names)


class NodeTable:
    """Live nodes by inode number, and the lookup cache (parent ino, name) -> node."""

    def __init__(self, lower_dev: int, upper_dev: int,
                 close_fd: Callable[[int], None] = os.close) -> None:
        # How a dropped node's keep_fd is closed: the last reference to an unlinked
        # object, whose close frees its blocks and may wait on the disk.
        self.close_fd = close_fd
        self.nodes: dict[int, Node] = {}
        self.dentries: dict[tuple[int, bytes], Node] = {}
        self.lower_dev = lower_dev
        self.upper_dev = upper_dev
        self._dynamic: dict[tuple, int] = {}
        self._next_dynamic = itertools.count(DYNAMIC_BASE)
        self._high_water = 0
        # Where names, drops and kept objects are written down for a successor
        # (rofs/store/journal.py); None: nowhere.
        self.journal = None

    def __getitem__(self, ino: int) -> Node:
        return self.nodes[ino]

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def __len__(self) -> int:
        return len(self.nodes)

    def candidate_ino(self, backing: tuple, recorded: int | None) -> int:
        """The inode number an object should show (see the module docstring)."""
        if recorded is not None and recorded > ROOT_INO:
            return recorded
        layer, dev, ino = backing
        if ROOT_INO < ino < UPPER_TAG:
            if layer == "L" and dev == self.lower_dev:
                return ino
            if layer == "U" and dev == self.upper_dev:
                return ino | UPPER_TAG
        return self._dynamic_ino(backing)

    def _dynamic_ino(self, backing: tuple) -> int:
        ino = self._dynamic.get(backing)
        if ino is None:
            ino = next(self._next_dynamic)
            self._dynamic[backing] = ino
        return ino

    def find_or_add(self, parent: Node, name: bytes, mode: int, *, upper: bool,
                    lower: tuple[bytes, ...] | None, backing: tuple,
                    recorded: int | None = None) -> Node:
        """The node for a name just resolved on disk, registered under that name."""
        ino = self.candidate_ino(backing, recorded)
        node = self.nodes.get(ino)
        if node is not None and _reused(node, backing):
            # The filesystem gave the number of a deleted upper object (which the kernel
            # may still cache) to this new one: same number, next generation.  The old
            # node's kernel references carry over, since FORGET names only the number.
            fresh = Node(ino, stat.S_IFMT(mode), upper=upper, lower=lower, backing=backing)
            fresh.generation = node.generation + 1
            fresh.lookups = node.lookups
            self.nodes[ino] = node = fresh
        elif node is not None and not _same_object(node, backing):
            # The number is taken by another object (a lower hard link broken by a
            # copy-up, or a stale record): keep both under distinct numbers.
            ino = self._dynamic_ino(backing)
            node = self.nodes.get(ino)
            if node is not None and not _same_object(node, backing):
                ino = next(self._next_dynamic)
                self._dynamic[backing] = ino
                node = None
        if node is None:
            node = Node(ino, stat.S_IFMT(mode), upper=upper, lower=lower, backing=backing)
            self.nodes[ino] = node
            if len(self.nodes) > self._high_water:
                self._high_water = len(self.nodes)
        self.add_link(node, parent, name)
        return node

    def add_root(self, node: Node) -> None:
        self.nodes[node.ino] = node

    def add_link(self, node: Node, parent: Node, name: bytes) -> None:
        key = (parent.ino, name)
        if key not in self.dentries:
            node.links.append((parent, name))
            parent.kids += 1
            if self.journal is not None:
                self.journal.link(node.ino, node.generation, parent.ino, name)
        self.dentries[key] = node

    def remove_link(self, node: Node, parent: Node, name: bytes) -> None:
        self.dentries.pop((parent.ino, name), None)
        try:
            node.links.remove((parent, name))
        except ValueError:
            return
        if self.journal is not None:
            self.journal.unlink(node.ino, parent.ino, name)
        parent.kids -= 1
        self.maybe_drop(parent)
        self.maybe_drop(node)

    def move_link(self, node: Node, old_parent: Node, old_name: bytes,
                  new_parent: Node, new_name: bytes) -> None:
        self.dentries.pop((old_parent.ino, old_name), None)
        if self.journal is not None:
            self.journal.unlink(node.ino, old_parent.ino, old_name)
            self.journal.link(node.ino, node.generation, new_parent.ino, new_name)
        links = node.links
        for i, link in enumerate(links):
            if link[0] is old_parent and link[1] == old_name:
                links[i] = (new_parent, new_name)
                old_parent.kids -= 1
                break
        else:
            links.append((new_parent, new_name))
        new_parent.kids += 1
        self.dentries[(new_parent.ino, new_name)] = node
        self.maybe_drop(old_parent)

    def swap_links(self, a: Node, a_parent: Node, a_name: bytes,
                   b: Node, b_parent: Node, b_name: bytes) -> None:
        """RENAME_EXCHANGE: a now lives at b's name and b at a's."""
        for node, old, new in ((a, (a_parent, a_name), (b_parent, b_name)),
                               (b, (b_parent, b_name), (a_parent, a_name))):
            for i, link in enumerate(node.links):
                if link[0] is old[0] and link[1] == old[1]:
                    node.links[i] = new
                    if self.journal is not None:
                        self.journal.unlink(node.ino, old[0].ino, old[1])
                        self.journal.link(node.ino, node.generation, new[0].ino, new[1])
                    break
        self.dentries[(a_parent.ino, a_name)] = b
        self.dentries[(b_parent.ino, b_name)] = a

    def rebind(self, node: Node, backing: tuple) -> None:
        """A copy-up moved the node to the upper layer; its number stays."""
        self._dynamic.pop(node.backing, None)
        node.backing = backing

    def maybe_drop(self, node: Node) -> None:
        """Forget a node nobody can reach any more: no kernel reference, no open file,
        no live child.

        A node that still has names may be dropped too (the kernel forgot it); it is
        found again on disk at the next lookup, with the same number.
        """
        pending = [node]
        while pending:
            node = pending.pop()
            if (node.lookups > 0 or node.open_fds or node.kids > 0
                    or node.ino == ROOT_INO or self.nodes.get(node.ino) is not node):
                continue
            del self.nodes[node.ino]
            links, node.links = node.links, []
            if self.journal is not None:
                self.journal.drop(node.ino, len(links))
            for parent, name in links:
                if self.dentries.get((parent.ino, name)) is node:
                    del self.dentries[(parent.ino, name)]
                parent.kids -= 1
                pending.append(parent)
            if self._dynamic.get(node.backing) == node.ino:
                del self._dynamic[node.backing]
            if node.keep_fd >= 0:
                self.set_keep_fd(node, -1)

    def set_keep_fd(self, node: Node, fd: int) -> None:
        """Keep `fd` (an O_PATH descriptor) of the node's object, closing the one it
        kept before; -1: keep none."""
        if node.keep_fd >= 0:
            if self.journal is not None:
                self.journal.let_go(node.keep_fd)
            self.close_fd(node.keep_fd)
        node.keep_fd = fd
        if fd >= 0 and self.journal is not None:
            self.journal.keep(fd, node.ino, 0)

    def shrink(self) -> bool:
        """Give memory back after the kernel forgot most nodes (a walk of a big tree
        followed by cache pressure): rebuild the tables at their current size.  Returns
        whether it did; cheap to call after every batch of forgets."""
        if self._high_water < SHRINK_MIN or len(self.nodes) * 4 > self._high_water:
            return False
        self.nodes = dict(self.nodes)
        self.dentries = dict(self.dentries)
        self._dynamic = dict(self._dynamic)
        self._high_water = max(len(self.nodes), len(self.dentries))
        return True


def _same_object(node: Node, backing: tuple) -> bool:
    """Whether `node` is the object just found on disk with this backing.

    An upper inode number is only unique while the inode lives: once all names of an
    upper object are gone the filesystem may give its number to a new object, while the
    kernel may still hold the old node.  A lower object never goes away, an indexed
    hard link lives on in the index, and an object rofs holds a descriptor of lives on
    too (its number cannot be reused): those stay the same object.
    """
    if node.backing != backing:
        return False
    return bool(node.links) or backing[0] == "L" or node.index_key is not None or \
        bool(node.open_fds) or node.keep_fd >= 0


def _reused(node: Node, backing: tuple) -> bool:
    """A deleted upper object whose inode number the filesystem now uses again."""
    return (node.backing == backing and backing[0] == "U" and not node.links
            and not node.open_fds and node.keep_fd < 0 and node.index_key is None)
