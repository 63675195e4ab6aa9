"""Scratch paths at mount time: wipe last session's changes, then lay out rwtab dirs.

Runs before the mount serves anything, on the upper layer directly:
1. `wipe`: every upper entry whose path is scratch (and holds no path of another class)
   is renamed into the work dir, one atomic rename each, then deleted; a crash in
   between leaves a work-dir temporary, removed at the next mount like any other.
   The lower layer shows through again.  A directory that holds a persistent or
   read-only path is kept as it is (its metadata, and whether it hides the lower
   directory's other entries); only its other entries are wiped.
2. `lay_out`: rwtab `empty` and `dirs` paths start out as an empty directory, or as
   the lower directory's tree of directories without their files: built in the work
   dir (opaque, with the lower directories' owner, mode, times and xattrs) and renamed
   into place.
"""

from __future__ import annotations

import logging
import os
import stat

from rofs import copyup
from rofs._sys import RENAME_NOREPLACE, proc_path, renameat2
from rofs.layers import UpperLayer, open_dir_fd, open_listable
from rofs.policy import Class, Path, Policy

log = logging.getLogger(__name__)


def show(path: Path) -> str:
    return "/" + b"/".join(path).decode(errors="replace")


def wipe(policy: Policy, upper: UpperLayer, index_fd: int | None = None) -> list[Path]:
    """Remove last session's scratch changes; returns the paths wiped.

    A copied-up lower hard link whose every upper name was wiped also leaves the index,
    so its other lower names show the lower content again; one that still has an upper
    name (a persistent one) keeps its copy there.
    """
    wiped: list[Path] = []
    if policy.trivial:
        return wiped
    keys: set[bytes] = set()
    # The upper root itself always stays (it is the mount's root).
    root = open_listable(upper.root_fd, b".")
    try:
        _wipe_children(policy, upper, root, (), wiped, keys)
    finally:
        os.close(root)
    drop_index_keys(upper, index_fd, keys)
    return wiped


def drop_index_keys(upper: UpperLayer, index_fd: int | None, keys: set[bytes]) -> None:
    """Remove the index entries of copied-up hard links left without any upper name."""
    if index_fd is None:
        return
    for key in keys:
        st = upper.try_stat(index_fd, key)
        if st is not None and st.st_nlink == 1:
            os.unlink(key, dir_fd=index_fd)


def _wipe_children(policy: Policy, upper: UpperLayer, dir_fd: int, path: Path,
                   wiped: list[Path], keys: set[bytes]) -> None:
    with os.scandir(dir_fd) as entries:
        names = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        child = path + (name,)
        scratch = policy.classify(child) is Class.SCRATCH
        below = policy.rules_below(child)
        if scratch and not any(r.cls is not Class.SCRATCH for r in below):
            detach(upper, dir_fd, name, keys)
            wiped.append(child)
        elif is_dir and (below or scratch):
            fd = open_listable(dir_fd, name)
            try:
                _wipe_children(policy, upper, fd, child, wiped, keys)
            finally:
                os.close(fd)


def detach(upper: UpperLayer, dir_fd: int, name: bytes, keys: set[bytes]) -> None:
    """Remove dir_fd/name (a whole tree) from the upper layer: one atomic rename into
    the work dir, then the deletion; `keys` gets the index names of hard links in it."""
    tmp = upper.temp_name()
    renameat2(dir_fd, name, upper.work_fd, tmp, RENAME_NOREPLACE)
    _index_keys(upper, upper.work_fd, tmp, keys)
    upper.remove_tree(upper.work_fd, tmp)


def _index_keys(upper: UpperLayer, dir_fd: int, name: bytes, keys: set[bytes]) -> None:
    """Index names of the indexed hard links at dir_fd/name and below."""
    st = upper.try_stat(dir_fd, name)
    if st is None:
        return
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        value = upper.get_marker(dir_fd, name, upper.markers.ino)
        parts = value.split() if value else []
        if len(parts) == 2:
            keys.add(parts[1])
    elif stat.S_ISDIR(st.st_mode):
        fd = open_listable(dir_fd, name)
        try:
            with os.scandir(fd) as entries:
                names = [os.fsencode(e.name) for e in entries]
            for child in names:
                _index_keys(upper, fd, child, keys)
        finally:
            os.close(fd)


def lay_out(policy: Policy, overlay) -> list[str]:
    """Give rwtab `empty` and `dirs` paths their starting layout; returns notes about
    the ones skipped."""
    notes = []
    for path, rule in sorted(policy.rules.items()):
        if rule.cls is not Class.SCRATCH or rule.kind == "files" or not path:
            continue
        reason = _start_dir(overlay, path, rule.kind == "dirs")
        if reason:
            notes.append("%s: %s %s: %s" % (rule.source, rule.kind, show(path), reason))
    return notes


def _start_dir(overlay, path: Path, with_subdirs: bool) -> str | None:
    parent = overlay.root
    for name in path[:-1]:
        parent = overlay.lookup(parent, name)
        if parent is None or not parent.is_dir:
            return "no such directory"
    node = overlay.lookup(parent, path[-1])
    try:
        if node is None or not node.is_dir:
            return "no such directory" if node is None else "not a directory"
        if node.upper:
            return "kept as it is: it holds paths of another class"
        layer = overlay.layer_for(parent, path[-1])
        up = overlay.upper_dirfd(parent, layer)
        tmp = layer.temp_name()
        try:
            _mirror(overlay, layer, node.lower, layer.work_fd, tmp, with_subdirs)
            renameat2(layer.work_fd, tmp, up, path[-1], RENAME_NOREPLACE)
        except BaseException:
            layer.remove_tree(layer.work_fd, tmp)
            raise
        return None
    finally:
        # Nothing is served yet: forget the nodes, the next lookup finds the new layout.
        if node is not None:
            overlay.table.maybe_drop(node)
        overlay.table.maybe_drop(parent)


def _mirror(overlay, layer, lower: tuple[bytes, ...], dir_fd: int, name: bytes,
            with_subdirs: bool) -> None:
    """An opaque copy of the lower directory `lower` at dir_fd/name: metadata only, and
    its subdirectories (recursively) when `with_subdirs`."""
    st = overlay.lower.stat(lower)
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    markers = layer.markers
    layer.set_marker(dir_fd, name, markers.opaque, b"y")
    if with_subdirs:
        src = overlay.lower.open_dir(lower)
        try:
            with os.scandir(src) as entries:
                subdirs = [os.fsencode(e.name) for e in entries
                           if e.is_dir(follow_symlinks=False)]
        finally:
            os.close(src)
        fd = open_dir_fd(dir_fd, name)
        try:
            for sub in subdirs:
                _mirror(overlay, layer, lower + (sub,), fd, sub, True)
        finally:
            os.close(fd)
    # Metadata last: creating the subdirectories changed the times.
    copyup.copy_meta(st, proc_path(dir_fd, name), markers.is_private,
                     overlay.lower.xattr_path(lower))
