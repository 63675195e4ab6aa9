"""Origins: what a copied-up object was in the lower layer, and whether the lower (the
image) changed since (docs/image-updates.md, docs/state-format.md).

At every copy-up rofs records the lower object in the `rofs.origin` marker of the copy:

    1 KIND SIZE MODE UID GID MTIME_NS CONTENT XATTRS PATH

KIND is f (regular file), d, l (symlink), c, b, p, s; MODE octal permission bits;
CONTENT the sha256 of a file's data (of a symlink's target, of a device's number; "-"
for a directory, and for a file over DIGEST_LIMIT, whose content is then unknown);
XATTRS the sha256 of its xattrs but the overlay's markers; PATH the first 128 bits of
the sha256 of the lower path it was copied from, relative to the lower root (a copy
renamed since is not where its origin was: a change made here; a digest, because a
user may make the path as deep as they like).  Kernel overlayfs ignores the
marker; rofs hides it like the others.  An object copied up before origins existed has
none: unknown, never guessed.

Each mount also records a fingerprint of the lower tree (`fingerprint`), so the next one
knows whether the image changed.

The base store (STATE/.rofs/bases/<MOUNTPOINT ...>/<CONTENT>) keeps what a three-way
merge needs and a digest cannot give back: the content of every text file up to
BASE_LIMIT at its copy-up, and the listing of a lower directory an opaque directory hid
when it was made.  Content-addressed, written without fsync: a base is used only when
its content still hashes to its name, so one torn by a crash is as good as none (the
merge then keeps the host's file and reports a conflict).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass

from rofs._sys import name_this_thread, open_noatime, write_all
from rofs.store.quoting import quote, unquote

log = logging.getLogger(__name__)

VERSION = b"1"
DIGEST_LIMIT = 64 << 20  # bigger files get no content digest (reading them costs)
BASE_LIMIT = 1 << 20  # text files up to this size keep their content in the base store
FINGERPRINT_LIMIT = 200_000  # entries: a bigger lower gets no fingerprint
_KINDS = ((stat.S_ISREG, b"f"), (stat.S_ISDIR, b"d"), (stat.S_ISLNK, b"l"),
          (stat.S_ISCHR, b"c"), (stat.S_ISBLK, b"b"), (stat.S_ISFIFO, b"p"),
          (stat.S_ISSOCK, b"s"))
UNKNOWN = b"-"


def kind_of(mode: int) -> bytes:
    return next((k for test, k in _KINDS if test(mode)), b"?")


@dataclass(frozen=True)
class Origin:
    kind: bytes
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    content: bytes  # hex digest, or UNKNOWN
    xattrs: bytes  # hex digest
    path: bytes = b""  # path_digest() of the lower path

    def encode(self) -> bytes:
        return b"%s %s %d %o %d %d %d %s %s %s" % (
            VERSION, self.kind, self.size, self.mode, self.uid, self.gid, self.mtime_ns,
            self.content, self.xattrs, self.path)

    def same_object(self, other: Origin) -> bool:
        """The same kind, size, mode, owner, mtime, content and xattrs (not path)."""
        return (self.kind, self.size, self.mode, self.uid, self.gid, self.mtime_ns,
                self.content, self.xattrs) == (other.kind, other.size, other.mode,
                                               other.uid, other.gid, other.mtime_ns,
                                               other.content, other.xattrs)

    def content_known(self) -> bool:
        return self.content != UNKNOWN or self.kind == b"d"


def parse(value: bytes | None) -> Origin | None:
    """The origin a marker records; None for none, or one this version cannot read."""
    if not value:
        return None
    parts = value.split()
    if len(parts) != 10 or parts[0] != VERSION:
        return None
    try:
        return Origin(parts[1], int(parts[2]), int(parts[3], 8), int(parts[4]),
                      int(parts[5]), int(parts[6]), parts[7], parts[8], parts[9])
    except ValueError:
        return None


def path_digest(lower_path: tuple[bytes, ...]) -> bytes:
    """PATH of an origin: 128 bits of the sha256 of the lower path, in hex."""
    return hashlib.sha256(b"/".join(lower_path)).hexdigest()[:32].encode()


def file_digest(fd: int, size: int) -> bytes:
    """The sha256 of a regular file's data (read with pread: shared descriptors keep
    their offset), UNKNOWN past DIGEST_LIMIT."""
    if size > DIGEST_LIMIT:
        return UNKNOWN
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest().encode()


def read_small(fd: int, size: int) -> bytes:
    """All of a file of about `size` (<= BASE_LIMIT) bytes (pread: offsets stay)."""
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 0) + 1, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


def of_regular(fd: int, st: os.stat_result, lower_path: tuple[bytes, ...],
               is_private) -> tuple[Origin, bytes | None]:
    """The origin of the regular file open at `fd`, and its data when the base store
    may keep it (up to BASE_LIMIT; None past it).  Reads the whole file: for a big one,
    call it in a worker thread."""
    xattrs = xattrs_digest(fd, is_private)
    if st.st_size > BASE_LIMIT:
        return of(st, file_digest(fd, st.st_size), xattrs, lower_path), None
    data = read_small(fd, st.st_size)
    return of(st, digest(data), xattrs, lower_path), data


def listed(names) -> tuple[bytes, bytes] | None:
    """A directory listing as the base store keeps it (escaped names, one a line), with
    its digest: (digest, data); None past BASE_LIMIT."""
    data = b"".join(quote(n).encode() + b"\n" for n in sorted(names))
    return (digest(data), data) if len(data) <= BASE_LIMIT else None


def keep_base(bases_fd: int, content: bytes, data: bytes) -> bool:
    """Keep text `data`, whose digest is `content`, in the base store (at most
    BASE_LIMIT bytes, no NUL); whether it is there now.  OSError: not kept."""
    if len(data) > BASE_LIMIT or b"\0" in data:
        return False
    try:
        os.stat(content, dir_fd=bases_fd)
        return True
    except FileNotFoundError:
        pass
    tmp = b".%s.%d.%d" % (content, os.getpid(), threading.get_ident())  # (worker threads)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=bases_fd)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, content, src_dir_fd=bases_fd, dst_dir_fd=bases_fd)
    return True


class BaseWriter:
    """Writes copy-ups' texts into a mount's base store from a thread of its own, a
    few seconds after the copy-ups, many at a time.  Written on the request path, each
    base file (an inode, a directory entry, a rename) joined the journal commit of that
    request's fsyncs: +40% on a run of small copy-ups (docs/performance.md).  Bases are
    best effort by design (a missing one makes a later merge a reported conflict), so
    what a crash loses in those seconds costs nothing worse.  What is queued is bounded
    (MAX_PENDING bytes; beyond, texts are dropped and counted); `close` writes the rest."""

    MAX_PENDING = 16 << 20
    DELAY = 2.0

    def __init__(self, bases_fd: int) -> None:
        self.bases_fd = bases_fd
        self.dropped = 0
        self._pending: list[tuple[bytes, bytes]] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rofs-bases", daemon=True)
        self._thread.start()

    def add(self, content: bytes, data: bytes) -> None:
        """Queue `data` (keep_base, in the thread, leaves out what is no text)."""
        with self._lock:
            if self._bytes + len(data) > self.MAX_PENDING:
                if not self.dropped:
                    log.warning("base store: copy-ups come faster than their texts are "
                                "kept; dropping (and counting) texts: later merges of those "
                                "files will be conflicts")
                self.dropped += 1
                return
            self._pending.append((content, data))
            self._bytes += len(data)

    def _run(self) -> None:
        name_this_thread()
        while not self._stop.wait(self.DELAY):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending, self._bytes = self._pending, [], 0
        for content, data in pending:
            try:
                keep_base(self.bases_fd, content, data)
            except OSError as e:
                self.dropped += 1
                log.warning("base store: cannot keep %s: %s", content.decode(), e.strerror)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


def base(bases_dir: str, content: bytes) -> bytes | None:
    """What the base store holds for digest `content`: None when it holds nothing, or
    something that no longer hashes to it (torn by a crash)."""
    if content == UNKNOWN or not content.isalnum():
        return None
    try:
        with open(os.path.join(os.fsencode(bases_dir), content), "rb") as f:
            data = f.read(BASE_LIMIT + 1)
    except OSError:
        return None
    return data if digest(data) == content else None


def unlisting(data: bytes) -> set[bytes]:
    return {unquote(line.decode()) for line in data.split(b"\n") if line}


def xattrs_digest(path: bytes | int, is_private) -> bytes:
    """The sha256 of an object's xattrs (sorted names and values) but the markers."""
    follow = isinstance(path, int)
    h = hashlib.sha256()
    try:
        names = sorted(os.fsencode(n) for n in os.listxattr(path, follow_symlinks=follow))
    except OSError:
        names = []
    for name in names:
        if is_private(name):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError:
            continue
        h.update(b"%d:%s%d:%s" % (len(name), name, len(value), value))
    return h.hexdigest().encode()


def content_digest(st: os.stat_result, path: bytes) -> bytes:
    """CONTENT for an object other than a regular file (by path, not followed)."""
    if stat.S_ISLNK(st.st_mode):
        return hashlib.sha256(os.readlink(path)).hexdigest().encode()
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return hashlib.sha256(b"%d" % st.st_rdev).hexdigest().encode()
    if stat.S_ISREG(st.st_mode):
        fd = open_noatime(path, os.O_RDONLY | os.O_NOFOLLOW)  # (the lower's atimes stay)
        try:
            return file_digest(fd, st.st_size)
        finally:
            os.close(fd)
    return UNKNOWN


def of(st: os.stat_result, content: bytes, xattrs: bytes,
       lower_path: tuple[bytes, ...] = ()) -> Origin:
    return Origin(kind_of(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0,
                  stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  content, xattrs, path_digest(lower_path))


def describe(path: bytes, is_private) -> Origin:
    """What an object at `path` (not followed) is now, as an origin records it (but
    its path)."""
    st = os.lstat(path)
    return of(st, content_digest(st, path), xattrs_digest(path, is_private))


def fingerprint(lower: str) -> str | None:
    """A digest of the lower tree: every path with its kind, mode, owner, size and mtime
    (not inode numbers: an image rebuilt identically keeps its fingerprint).  None for a
    tree past FINGERPRINT_LIMIT entries."""
    h = hashlib.sha256()
    count = 0
    stack = [b""]
    top = os.fsencode(lower)
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(top + rel if rel else top) as entries:
                names = sorted(e.name for e in entries)
        except OSError:
            continue
        for name in names:
            count += 1
            if count > FINGERPRINT_LIMIT:
                return None
            path = rel + b"/" + name
            try:
                st = os.lstat(top + path)
            except OSError:
                continue
            h.update(b"%s\0%s %o %d %d %d %d\n" % (
                path, kind_of(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_mtime_ns))
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
    return h.hexdigest()
