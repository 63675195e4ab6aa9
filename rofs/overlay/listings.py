"""Listings: the merged names of a directory as readdir passes see them (snapshots
per open directory, shared while its names do not change), listings by node for the
kernel's own opens (no_open: offsets are keyed hashes of the names, kept up to date
name by name), and how both are read from the layers (a big directory on a worker)."""

from __future__ import annotations

import bisect
import errno
import functools
import hashlib
import heapq
import os
from collections.abc import Callable, Iterator

from rofs import crash
from rofs._sys import malloc_trim
from rofs.overlay.base import (
    HASHED_NAMES,
    TRIM_AFTER_NAMES,
    DirHandle,
    HashedListing,
    Listing,
    _err,
)
from rofs.store.inodes import Node
from rofs.store.layers import is_whiteout, reopen_listable

# Names given to a directory listed by node are kept apart until there are more than
# this (and a sixteenth of the listing), then folded in (Listings._hashed_add).
FOLD_AFTER = 4096


def _first(pair: tuple[int, bytes]) -> int:
    return pair[0]


# Directories whose layers' sizes add up to more than this (about a thousand names on
# ext4) are read on a worker thread when a listing of them is taken, so that reading a
# user's big directory never holds the loop (and everyone's requests) up.
BIG_DIRECTORY = 64 << 10


def _ALL(name: bytes) -> bool:
    return True


def _of_layer(class_layer, base: tuple[bytes, ...], layer, name: bytes) -> bool:
    return class_layer(base + (name,)) is layer


def _merged(sources: list[tuple[int, Callable[[bytes], bool] | None]]) -> Iterator[bytes]:
    """The merged listing of View._sources: upper names (minus whiteouts), then the
    lower names no upper entry hides.  Closes every descriptor, read or not."""
    hidden: set[bytes] = set()
    try:
        for fd, mine in sources:
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = os.fsencode(entry.name)
                    if mine is None:
                        if name not in hidden:
                            yield name
                        continue
                    if not mine(name):
                        continue  # an entry of the other class's layer decides
                    hidden.add(name)
                    if not (entry.is_dir(follow_symlinks=False) or
                            entry.is_file(follow_symlinks=False) or
                            entry.is_symlink()) and is_whiteout(
                                entry.stat(follow_symlinks=False)):
                        continue
                    yield name
    finally:
        for fd, _ in sources:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_on_worker(read, *args):
    crash.pause("listing:read")
    return read(*args)


def _cookie(key: bytes, name: bytes) -> int:
    """A name's offset in listings by node: its keyed hash, past . and .."""
    return (int.from_bytes(hashlib.blake2b(name, key=key, digest_size=8).digest(),
                           "little") >> 3) + 3


def _collect_hashed(sources: list, limit: int | None, key: bytes
                    ) -> tuple[list[int], list[bytes]]:
    """_collect's names in the order of their offsets (_cookie), and the offsets.
    Sorted as plain integers (a sort holds the interpreter, and one of tuples takes
    several times as long), names by offset from a dict."""
    listed = _collect(sources, limit)
    by_cookie = {_cookie(key, name): name for name in listed}
    if len(by_cookie) < len(listed):  # two names with one offset: keep both
        pairs = sorted((_cookie(key, name), name) for name in listed)
        return [c for c, _ in pairs], [n for _, n in pairs]
    cookies = _sort_in_pieces(list(by_cookie))
    return cookies, [by_cookie[c] for c in cookies]


SORT_PIECE = 4096  # offsets one C call sorts at a time (well under a millisecond)


def _sort_in_pieces(cookies: list[int]) -> list[int]:
    """sorted(cookies), for offsets (_cookie: below 2**61 + 3, spread evenly), without
    holding the interpreter lock long: one sort of 200,000 of them held it for tens of
    milliseconds, and the request loop, on another thread, waited that long.  They are
    dealt into buckets by their top bits (bytecode, which lets the loop in), and each
    bucket, a few thousand at most in the even case, is sorted on its own."""
    if len(cookies) <= SORT_PIECE:
        return sorted(cookies)
    bits = (len(cookies) // SORT_PIECE).bit_length()
    shift = 61 - bits
    buckets: list[list[int]] = [[] for _ in range((1 << bits) + 1)]
    for cookie in cookies:
        buckets[cookie >> shift].append(cookie)
    ordered: list[int] = []
    for bucket in buckets:
        bucket.sort()
        ordered += bucket
    return ordered


def _collect(sources: list, limit: int | None) -> list[bytes]:
    """The names of _merged(sources), ENOMEM past `limit` of them (None: no limit)."""
    names: list[bytes] = []
    merged = _merged(sources)
    try:
        for name in merged:
            names.append(name)
            if limit is not None and len(names) > limit:
                raise _err(errno.ENOMEM)
    finally:
        merged.close()
    return names


class Listings:
    """Overlay's listings (a part of class Overlay, rofs/overlay/__init__.py, whose
    state every method here uses)."""


    def list_names(self, node: Node) -> list[bytes]:
        """The merged directory listing: upper names (minus whiteouts), then the lower
        names the upper does not hide."""
        return list(self._merged_names(node))

    def has_entries(self, node: Node) -> bool:
        """Whether the merged directory holds any name (rmdir's and rename's ENOTEMPTY):
        the listing is read only up to its first visible name, so a directory of any
        size costs little here unless it is all whiteouts."""
        names = self._merged_names(node)
        try:
            return next(names, None) is not None
        finally:
            names.close()

    def _names_within(self, node: Node, limit: int | None) -> list[bytes]:
        """list_names for a listing held for a user: ENOMEM as soon as it passes
        `limit` names (None: no limit), so a directory past the user's share is not
        read to its end first."""
        return _collect(self._sources(node), limit)

    def _merged_names(self, node: Node) -> Iterator[bytes]:
        """list_names's names as they are read, each layer's listing open only while
        it is being read (a caller that stops early closes the generator)."""
        return _merged(self._sources(node))

    def _sources(self, node: Node) -> list[tuple[int, Callable[[bytes], bool] | None]]:
        """What a listing of `node` reads, in order: a descriptor of each upper layer's
        directory with the test of which names are that layer's (True: all; the other
        class's layer decides its own), then the lower directory's (None).  Taken on
        the loop's thread; reading them touches nothing of the model (_merged), so it
        may run on a worker.  The descriptors are the reader's to close."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        sources: list[tuple[int, Callable[[bytes], bool] | None]] = []
        home = self._lay(node)
        base = self.path_of(node) if self.scratch_layer is not None else None
        try:
            for layer in self._layers():
                if layer is home:
                    up = self.upper_dirfd(node) if node.upper else None
                else:
                    up = self.upper_dirfd(node, layer, create=False)
                if up is None:
                    continue
                fd = os.open(reopen_listable(up), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                if base is None:
                    sources.append((fd, _ALL))
                else:
                    sources.append((fd, functools.partial(_of_layer, self._class_layer,
                                                          base, layer)))
            if node.lower is not None:
                try:
                    sources.append((self.lower.open_dir(node.lower), None))
                except (FileNotFoundError, NotADirectoryError):
                    pass
        except BaseException:
            for fd, _ in sources:
                os.close(fd)
            raise
        return sources

    def _big(self, sources: list) -> bool:
        """Whether a listing of these is worth a worker thread (BIG_DIRECTORY)."""
        return sum(os.fstat(fd).st_size for fd, _ in sources) > BIG_DIRECTORY

    def opendir(self, node: Node, uid: int = 0) -> int:
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        dh = next(self._dir_ids)
        self.dirs[dh] = DirHandle(node, uid)
        return dh

    def readdir(self, dh: int, start: int) -> Iterator[tuple[int, bytes, Node | None]]:
        """Entries from offset `start`: (next offset, name, node); node None for a name
        that cannot be looked up (a r-- directory: EACCES), listed as a native
        filesystem lists it, without attributes.

        The listing is a snapshot taken at the first read (and again on rewind), so
        concurrent creates and removals never shift offsets: nothing is returned twice
        or skipped.  Names removed since the snapshot are left out.  Handles that start
        a pass while no name changed anywhere share one snapshot, so holding many
        handles open on a big directory costs one listing; distinct listings held for
        users other than root are bounded (LISTING_BUDGET names, a quarter of it for one
        user: past it, ENOMEM).
        """
        handle = self.dirs[dh]
        if handle.listing is None or (start == 0 and handle.served):
            self._take_listing(handle)
        handle.served = True
        yield from self._dots(handle.node, start, 1, 2)
        names = handle.listing.names
        for index in range(max(start - 2, 0), len(names)):
            entry = self._entry(handle.node, names[index])
            if entry is not False:
                yield index + 3, names[index], entry

    def _dots(self, node: Node, start: int, dot: int, dot_dot: int):
        """. and .. (offsets `dot` and `dot_dot`), first in every listing, as on any
        filesystem."""
        if start < dot:
            yield dot, b".", node
        if start < dot_dot:
            yield dot_dot, b"..", node.parent() or node

    def _entry(self, parent: Node, name: bytes) -> Node | None | bool:
        """The node a listed name leads to; None when it cannot be looked up (EACCES),
        False when it is gone since the listing was taken."""
        try:
            node = self.lookup(parent, name)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        return False if node is None else node

    def readdir_by_node(self, node: Node, start: int,
                        uid: int = 0) -> Iterator[tuple[int, bytes, Node | None]]:
        """Entries of directory `node` after offset `start` when the kernel opened the
        directory itself (no_open), so no handle holds a snapshot: the listing goes in
        the order of a keyed hash of each name, which is the entry's offset, so a listing
        resumed after names came and went returns no name twice and skips none that
        stayed.  (Two names with the same 61-bit hash, under a key chosen at mount, would
        hide one of them from a listing resumed between them.)  The listing is taken from
        the layers once and then kept up to date name by name as names are given to the
        directory, so a change costs no new listing of it.  A listing bigger than a
        user's share of LISTING_BUDGET is refused to users other than root (ENOMEM), as
        with handles."""
        hashed = self._hashed_listing(node, uid)
        yield from self._dots(node, start, 1, 2)
        cookies, names, added = hashed.cookies, hashed.names, hashed.added
        taken = ((cookies[k], names[k]) for k in range(bisect.bisect_right(cookies, start),
                                                          len(cookies)))
        since = added[bisect.bisect_right(added, start, key=_first):]
        for cookie, name in heapq.merge(taken, since) if since else taken:
            entry = self._entry(node, name)
            if entry is not False:
                yield cookie, name, entry

    def _cookie(self, name: bytes) -> int:
        return _cookie(self._hash_key, name)

    def _hashed_listing(self, node: Node, uid: int) -> HashedListing:
        """The merged listing of `node` ordered by offset (readdir_by_node), kept while
        no change names no directory (revert, restore), the newest HASHED_NAMES names'
        worth (at least one listing)."""
        kept = self._hashed.get(node.ino)
        if kept is not None and kept.node is node:
            self._hashed.move_to_end(node.ino)
            return kept
        return self._keep_hashed(node, *_collect_hashed(
            self._sources(node), None if uid == 0 else self.listing_budget // 4,
            self._hash_key))

    def _keep_hashed(self, node: Node, cookies: list[int], names: list[bytes]
                     ) -> HashedListing:
        hashed = HashedListing(node, cookies, names)
        kept = self._hashed.get(node.ino)
        if kept is not None:
            self._hashed_names -= len(kept)
        self._hashed[node.ino] = hashed
        self._hashed.move_to_end(node.ino)
        self._hashed_names += len(hashed)
        while self._hashed_names > HASHED_NAMES and len(self._hashed) > 1:
            _, old = self._hashed.popitem(last=False)
            self._hashed_names -= len(old)
        return hashed

    def _names_changing(self, named: list[tuple[Node, bytes]], ended: bool = False) -> None:
        """A change of names begins or ends (base._changes_names): the listings of the
        directories it names are no longer shared with new passes, and a name given to
        a directory listed by node joins that listing; a change naming no directory lets
        go of them all."""
        self.generation += 1
        if not named:
            self._listings.clear()
            self._hashed.clear()
            self._hashed_names = 0
            for changed in self._changed_while_read.values():
                changed.append(None)
            return
        for parent, name in named:
            self._listings.pop(parent.ino, None)
            changed = self._changed_while_read.get(parent.ino)
            if changed is not None:
                changed.append(name)
            if ended:
                self._hashed_add(parent, name)

    def _hashed_add(self, parent: Node, name: bytes) -> None:
        """`name` may be new in `parent`: into its listing by node, if it has one and the
        name is not there yet.  The names added are folded in once they are more than a
        sixteenth of it; when most of it is names that came and went, it is dropped, to
        be taken again at its next read."""
        hashed = self._hashed.get(parent.ino)
        if hashed is None or hashed.node is not parent:
            return
        cookie = self._cookie(name)
        cookies, names = hashed.cookies, hashed.names
        i = bisect.bisect_left(cookies, cookie)
        while i < len(cookies) and cookies[i] == cookie:
            if names[i] == name:
                return
            i += 1
        pair = (cookie, name)
        j = bisect.bisect_left(hashed.added, pair)
        if j < len(hashed.added) and hashed.added[j] == pair:
            return
        hashed.added.insert(j, pair)
        self._hashed_names += 1
        if len(hashed.added) <= FOLD_AFTER + len(names) // 16:
            return
        if len(hashed) > 2 * hashed.taken + FOLD_AFTER:
            del self._hashed[parent.ino]
            self._hashed_names -= len(hashed)
            return
        pairs = list(heapq.merge(zip(cookies, names, strict=True), hashed.added))
        hashed.cookies, hashed.names = [c for c, _ in pairs], [n for _, n in pairs]
        hashed.added = []

    def _take_listing(self, handle: DirHandle, names: list[bytes] | None = None,
                      share: bool = True) -> None:
        """Give the handle the directory's shared listing, or a new one: `names` read
        already (read_listing), or read now.  `share`: whether later passes may share
        it (not when names changed while it was read)."""
        node = handle.node
        listing = self._listings.get(node.ino) if names is None else None
        if listing is None or listing.node is not node:
            uid = handle.uid
            limit = self._handle_limit(uid)
            if names is None:
                names = self._names_within(node, limit)
            elif limit is not None and len(names) > limit:
                raise _err(errno.ENOMEM)  # others' listings took the share meanwhile
            listing = Listing(node, tuple(names), uid)
            if share:
                self._listings[node.ino] = listing
            self.listed_names += len(names)
            self._listed_by_uid[uid] += len(names)
        listing.users += 1  # first: the handle may hold this very listing already
        self._drop_listing(handle)
        handle.listing = listing

    def _handle_limit(self, uid: int) -> int | None:
        """The most names a new listing held for `uid` may have (None: root's)."""
        if uid == 0:
            return None
        return min(self.listing_budget - self.listed_names,
                   self.listing_budget // 4 - self._listed_by_uid[uid])

    def listing_to_read(self, dh: int, node: Node | None, start: int) -> bool:
        """Whether a READDIR (of handle `dh`, or of `node` by node) needs a listing read
        from the layers first: then await read_listing before readdir/readdir_by_node."""
        if dh:
            handle = self.dirs.get(dh)
            if handle is None or not (handle.listing is None or
                                      (start == 0 and handle.served)):
                return False
            shared = self._listings.get(handle.node.ino)
            return shared is None or shared.node is not handle.node
        kept = self._hashed.get(node.ino)
        return kept is None or kept.node is not node

    async def read_listing(self, dh: int, node: Node | None, start: int, uid: int) -> None:
        """Read the listing a READDIR needs (listing_to_read), on a worker thread when
        the directory is big (BIG_DIRECTORY), so the loop goes on serving others: its
        names, and for a listing by node their offsets, in order.  One read of a
        directory at a time: a READDIR arriving meanwhile waits for it and takes its
        listing where it may.  Names given to or taken from the directory meanwhile
        are caught up with."""
        handle = self.dirs[dh] if dh else None
        if handle is not None:
            node = handle.node
        while (reading := self._scanning.get(node.ino)) is not None:
            await reading.wait()
        if not self.listing_to_read(dh, node, start) or \
                (handle is not None and self.dirs.get(dh) is not handle):
            return
        if handle is not None:
            limit = self._handle_limit(handle.uid)
            read, args = _collect, ()
        else:
            limit = None if uid == 0 else self.listing_budget // 4
            read, args = _collect_hashed, (self._hash_key,)
        sources = self._sources(node)
        changed: list = []
        self._changed_while_read[node.ino] = changed
        self._scanning[node.ino] = reading = self.loop.event()
        try:
            if self._big(sources):
                found = await self.loop.offload(_read_on_worker, read, sources, limit, *args)
            else:
                found = read(sources, limit, *args)
        finally:
            del self._changed_while_read[node.ino]
            del self._scanning[node.ino]
            reading.set()
        if handle is not None:
            if self.dirs.get(dh) is not handle:
                return  # released meanwhile
            self._take_listing(handle, found, share=not changed)
            handle.served = False  # a listing for this pass: readdir takes no other
        elif None not in changed and node.is_dir:
            self._keep_hashed(node, *found)
            for name in changed:
                self._hashed_add(node, name)

    def _drop_listing(self, handle: DirHandle) -> None:
        listing, handle.listing = handle.listing, None
        if listing is None:
            return
        listing.users -= 1
        if listing.users:
            return
        self.listed_names -= len(listing.names)
        self._listed_by_uid[listing.uid] -= len(listing.names)
        if not self._listed_by_uid[listing.uid]:
            del self._listed_by_uid[listing.uid]
        if self._listings.get(handle.node.ino) is listing:
            del self._listings[handle.node.ino]
        if len(listing.names) >= TRIM_AFTER_NAMES:
            del listing
            malloc_trim()  # give a big listing's memory back to the system

    def releasedir(self, dh: int) -> None:
        handle = self.dirs.pop(dh, None)
        if handle is not None:
            self._drop_listing(handle)
