"""The hard-link index of the upper layer: a lower file known under several names is
copied up once, and its copy is linked into the index dir (STATE/.rofs/index/<mount>/)
as `<lower st_ino>.<lower st_ctime_ns>`, the index name its rofs.ino marker records,
so that its names not met yet find the copy (docs/state-format.md, "The index").

What here keeps the index true when entries leave the upper layer (a revert, the
attic, a scratch path) or come back into it: an index entry whose file has no upper
name left goes, so the other lower names show the lower file again.  Callers hold the
upper layer (the daemon, or a tool under the upper layer's lock).
"""

from __future__ import annotations

import collections
import os
import stat

from rofs._sys import RENAME_NOREPLACE, renameat2
from rofs.store.layers import UpperLayer, visit_tree


def index_name(upper: UpperLayer, dir_fd: int, name: bytes) -> bytes | None:
    """The index name an upper file records (a copied-up lower hard link), if any."""
    value = upper.get_marker(dir_fd, name, upper.markers.ino)
    parts = value.split() if value else []
    return parts[1] if len(parts) == 2 else None


def index_keys(upper: UpperLayer, dir_fd: int, name: bytes) -> collections.Counter:
    """Index names of the indexed hard links at dir_fd/name and below, with how many of
    their names are there."""
    keys: collections.Counter = collections.Counter()

    def visit(parent: int, child: bytes, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            key = index_name(upper, parent, child)
            if key is not None:
                keys[key] += 1

    visit_tree(dir_fd, name, visit)
    return keys


def drop_index_entries(upper: UpperLayer, elsewhere: dict[bytes, int]) -> None:
    """Remove the index entries (upper.index_fd) of copied-up hard links with no name
    left in the upper layer, `elsewhere` (key -> names) being the names they have
    outside it (in the attic, or none once deleted), so that their other lower names
    show the lower file again."""
    if upper.index_fd is None:
        return
    for key, names in elsewhere.items():
        st = upper.try_stat(upper.index_fd, key)
        if st is not None and st.st_nlink - names <= 1:
            os.unlink(key, dir_fd=upper.index_fd)


def relink_index(upper: UpperLayer, dir_fd: int, name: bytes) -> None:
    """After entries came back into the upper layer: link the indexed hard links among
    them into the index again, where their entry was dropped when they moved out."""
    if upper.index_fd is None:
        return

    def visit(parent: int, child: bytes, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            return
        key = index_name(upper, parent, child)
        # Only while some of its lower names are still outside the upper layer (the
        # nlink marker); once none is, the index entry has no more use.
        if key is not None and upper.get_marker(parent, child, upper.markers.nlink) and \
                upper.try_stat(upper.index_fd, key) is None:
            os.link(child, key, src_dir_fd=parent, dst_dir_fd=upper.index_fd,
                    follow_symlinks=False)

    visit_tree(dir_fd, name, visit)


def detach(upper: UpperLayer, dir_fd: int, name: bytes) -> None:
    """Remove dir_fd/name (a whole tree) from the upper layer: one atomic rename into
    the work dir, then the deletion.  A copied-up lower hard link left without an upper
    name leaves the index too (upper.index_fd), so its other lower names show the lower
    file again."""
    tmp = upper.temp_name()
    renameat2(dir_fd, name, upper.work_fd, tmp, RENAME_NOREPLACE)
    keys = index_keys(upper, upper.work_fd, tmp)
    upper.remove_tree(upper.work_fd, tmp)
    drop_index_entries(upper, dict.fromkeys(keys, 0))  # deleted: no names left
