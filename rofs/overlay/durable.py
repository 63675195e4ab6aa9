"""Durability: what a change needs on disk before its reply (docs/reliability.md).

Every change of a name in the persistent layer is durable when its call returns: the
object is complete (a regular file's data fsynced) before the rename that names it, and
the directories whose entries changed (then a moved directory whose marker was set) are
fsynced before the reply.  The changes of one request are collected while it runs
(`_entries_changed`) and fsynced in one batch on a worker thread (`settle`), so the
loop serves others meanwhile.  A batch also waits for
the batches started before it: a directory one request changed may have been taken into
another request's batch, which must be done before either reply goes out.

The order of the steps inside a change is kept by the state filesystem itself: the
journaling and copy-on-write filesystems rofs supports (ext4, xfs, btrfs) persist
metadata operations in the order they were made, and each change is one rename of a
prepared object, so no fsync is needed between its steps.  What they do not order is
file data against metadata: hence the fsync of a copy-up before its rename, and of a
regular file before it is renamed (as ext4's auto_da_alloc does for a rename over an
existing file, but for every rename and every filesystem).
"""

from __future__ import annotations

import errno
import logging
import os

from rofs.overlay.base import _err
from rofs.store.layers import UpperLayer

log = logging.getLogger(__name__)


class _Batch:
    __slots__ = ("done", "error")

    def __init__(self, done) -> None:
        self.done = done  # an event of the loop's, set when the batch is on disk
        self.error: OSError | None = None


def _fsync_all(fds: list[int]) -> None:
    """fsync each descriptor, closing all of them; raises the first failure."""
    failure = None
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as e:
            failure = failure or e
        finally:
            os.close(fd)
    if failure is not None:
        raise failure


class Durable:
    """Overlay's durability (a part of class Overlay, rofs/overlay/__init__.py,
    whose state every method here uses)."""

    def _entries_changed(self, layer: UpperLayer, dir_fd: int) -> None:
        """Directory `dir_fd` of `layer` got or lost an entry: it is fsynced before the
        reply (settle).  Scratch directories are not: the next mount empties them."""
        if layer is not self.upper:
            return
        try:
            st = os.fstat(dir_fd)
            key = (st.st_dev, st.st_ino)
            if key not in self._unsynced:
                # A descriptor of its own (the directory cache may close the one given
                # before the batch runs, and it may be O_PATH, which fsync refuses).
                self._unsynced[key] = os.open(
                    b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:  # no descriptor to spare (a cached one may be O_PATH, which
            os.sync()  # fsync refuses): everything, now.  Rare, and never raises.

    def _moved_dir_marked(self, layer: UpperLayer, dir_fd: int, name: bytes) -> None:
        """Directory `name` got a redirect or opaque marker before it moves: it is
        fsynced with the batch, after the directories (before them, btrfs kept a moved
        directory under both names after a power cut: tests/test_power_cut.py).  Never
        raises: its parent's fsync then has to do."""
        if layer is not self.upper:
            return
        try:
            self._unsynced_objects.append(os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=dir_fd))
        except OSError as e:
            log.warning("cannot open %r to fsync it: %s", name, e)

    @property
    def settled(self) -> bool:
        """Nothing left to sync and no batch running: a reply can go out at once."""
        return not self._unsynced and not self._unsynced_objects and self._sync_tail is None

    def settle(self, strict: bool = False):
        """An awaitable, done when every change made so far is on disk.  Await it at
        once (it holds later batches).  If an fsync of the state failed, that is logged
        and counted; `strict` (fsync and fsyncdir requests) raises EIO too.  A change
        does not: it was made, and the kernel's view of it must stay what the disk has
        (an error reply to an unlink would leave the kernel showing the name), like
        every failure after a change's commit point."""
        # Directories first: btrfs, given a moved directory's fsync before its parent's,
        # kept both its names after a power cut (tests/test_power_cut.py).
        fds = [*self._unsynced.values(), *self._unsynced_objects]
        self._unsynced.clear()
        self._unsynced_objects.clear()
        batch = _Batch(self.loop.event())
        previous, self._sync_tail = self._sync_tail, batch
        return self._run_batch(fds, previous, batch, strict)

    async def _run_batch(self, fds: list[int], previous: _Batch | None,
                         batch: _Batch, strict: bool) -> None:
        try:
            if fds:
                await self.loop.offload_short(_fsync_all, fds)
        except OSError as e:
            batch.error = e
            self.sync_failures += 1
            log.error("fsync of the state failed: %s (the change is made but may not "
                      "survive a power loss)", e)
        if previous is not None:
            await previous.done.wait()
            batch.error = batch.error or previous.error
        batch.done.set()
        if self._sync_tail is batch:
            self._sync_tail = None
        if strict and batch.error is not None:
            raise _err(errno.EIO)

    async def _sync_data(self, dir_fd: int, name: bytes, node) -> None:
        """fsync a regular file about to be renamed, so its new name never shows it torn
        after a power loss (sed -i writes a copy and renames it, without fsync)."""
        fd = next(iter(node.open_fds), -1) if node.open_fds else -1
        fd = os.dup(fd) if fd >= 0 else _open_to_sync(dir_fd, name)
        if fd is None:
            log.warning("cannot open %r to fsync it before its rename", name)
            return
        await self.loop.offload_short(_fsync_all, [fd])


def _open_to_sync(dir_fd: int, name: bytes) -> int | None:
    """A descriptor of file or directory `name` to fsync by: read-only, else (an
    unprivileged daemon, a 0200 file) write-only; None if neither may be opened."""
    for flags in (os.O_RDONLY, os.O_WRONLY):
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                           dir_fd=dir_fd)
        except (PermissionError, IsADirectoryError):
            continue
    return None
