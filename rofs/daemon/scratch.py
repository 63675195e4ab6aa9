"""Scratch paths at mount time: set aside what an older policy saved, lay out rwtab dirs.

Runs before the mount serves anything, on the persistent upper layer directly (the
scratch layer itself is simply emptied, rofs.store.state.prepare_scratch):
1. `set_aside`: every upper entry whose path the policy now makes scratch (and that
   holds no path of another class) was saved under an older policy, so it is moved
   into the attic (rofs.store.attic), one atomic rename each, never deleted.  The lower
   layer shows through again.  A directory that holds a persistent or read-only path
   is kept as it is (its metadata, and whether it hides the lower directory's other
   entries); only its other entries move.
2. `lay_out`: rwtab `empty` and `dirs` paths start out as an empty directory, or as
   the lower directory's tree of directories without their files: built in the work
   dir (opaque, with the lower directories' owner, mode, times and xattrs) and renamed
   into place.
"""

from __future__ import annotations

import logging
import os

from rofs._sys import RENAME_NOREPLACE, proc_path, renameat2
from rofs.store import attic, copyup
from rofs.store.layers import UpperLayer, open_dir_fd, open_listable
from rofs.store.policy import Class, Path, Policy
from rofs.store.quoting import quote, quote_path

log = logging.getLogger(__name__)


def set_aside(policy: Policy, upper: UpperLayer, attic_base: str,
              mountpoint: str) -> attic.Moved | None:
    """Move what the persistent upper layer holds under paths the policy makes scratch
    into the attic (None: nothing to move).

    Since scratch changes have a layer of their own, whatever the upper layer holds
    there was saved under an older policy: it is the host's data, so it goes to the
    attic, never away.  A copied-up lower hard link whose every upper name moved also
    leaves the index, so its other lower names show the lower content again.
    """
    if policy.trivial:
        return None
    targets: list[Path] = []
    root = open_listable(upper.root_fd, b".")
    try:
        _scratch_entries(policy, root, (), targets)
    finally:
        os.close(root)
    if not targets:
        return None
    rules = {policy.rule_for(p) for p in targets}
    reason = "the policy makes these paths scratch (%s)" % ", ".join(sorted(
        "the default class" if rule is None else rule.source for rule in rules))
    return attic.move_aside(upper, targets, attic_base, quote(mountpoint), reason)


def _scratch_entries(policy: Policy, dir_fd: int, path: Path, out: list[Path]) -> None:
    """The topmost entries below dir_fd (at `path`) whose class is scratch and that
    hold no path of another class.  Recursion follows the policy's rules only, never
    the depth of a user's tree."""
    with os.scandir(dir_fd) as entries:
        names = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        child = path + (name,)
        scratch = policy.classify(child) is Class.SCRATCH
        below = policy.rules_below(child)
        if scratch and not any(r.cls is not Class.SCRATCH for r in below):
            out.append(child)
        elif is_dir and (below or scratch):
            fd = open_listable(dir_fd, name)
            try:
                _scratch_entries(policy, fd, child, out)
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
            notes.append("%s: %s %s: %s" % (rule.source, rule.kind, quote_path(path), reason))
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
