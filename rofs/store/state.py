"""The state directory: layout, format version, capability probe, exclusive use.

    STATE/<mountpoint without leading slash>/   the upper layer of that mount
    STATE/.rofs/format                          "rofs-state N [userxattr]": the layout
                                                version, and which markers it uses
    STATE/.rofs/work/<mountpoint ...>/          the work dir of that mount (same fs)
    STATE/.rofs/index/<mountpoint ...>/         copied-up lower hard links (same fs)
    STATE/.rofs/log/<mountpoint ...>.jsonl      the write log (rofs.store.writelog): root's,
                                            and .uid-N.jsonl each other uid's

See docs/state-format.md.  Everything that can be wrong with a state dir is checked
before the mount, and a failed check leaves nothing behind that it created.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field

from rofs._sys import RENAME_WHITEOUT, open_read_only_tree, proc_path, renameat2
from rofs.store import copyup
from rofs.store.layers import Markers, UpperLayer, remove_path

FORMAT_VERSION = 1
FORMAT_FILE = "format"
USERXATTR = "userxattr"  # the format file's flag for user.overlay.* markers
PRIVATE_DIR = ".rofs"


class StateError(Exception):
    """A problem with the state dir, worth one line to the user (exit code 2)."""


@dataclass
class Prepared:
    """Open descriptors of a ready state dir; the lock is held while they are open."""

    lower_fd: int
    upper_fd: int
    work_fd: int
    index_fd: int
    lock_fd: int
    upper_path: str
    work_path: str
    markers: Markers
    created: list[str] = field(default_factory=list)
    moved: object = None  # rofs.store.attic.Moved: saved changes set aside at this mount
    # Whether the lower tree differs from the one the last mount recorded (an image
    # update): None when unknown (a first mount, or a lower too big to fingerprint).
    image_changed: bool | None = None
    # The scratch layer (see prepare_scratch), when the policy has scratch paths.
    scratch_upper_fd: int = -1
    scratch_work_fd: int = -1
    scratch_index_fd: int = -1
    scratch_path: str = ""
    bases_fd: int = -1  # the base store (rofs/store/origin.py)
    reconciled: object = None  # rofs.store.reconcile.Result of a reconcile at this mount

    def close(self) -> None:
        for fd in (self.index_fd, self.work_fd, self.upper_fd, self.lower_fd, self.lock_fd,
                   self.bases_fd, self.scratch_upper_fd, self.scratch_work_fd,
                   self.scratch_index_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass


def mount_name(mountpoint: str) -> str:
    """STATE-relative name of a mount's upper dir: the mountpoint minus its leading '/'."""
    name = os.path.normpath(mountpoint).lstrip("/")
    if not name:
        raise StateError("mounting over / is not supported")
    return name


def upper_dir(state: str, mountpoint: str) -> str:
    return os.path.join(state, mount_name(mountpoint))


def work_dir(state: str, mountpoint: str) -> str:
    return os.path.join(state, PRIVATE_DIR, "work", mount_name(mountpoint))


def index_dir(state: str, mountpoint: str) -> str:
    return os.path.join(state, PRIVATE_DIR, "index", mount_name(mountpoint))


def layer_paths(state: str, mountpoint: str,
                overlay: tuple[str, str] | None = None) -> tuple[str, str, str]:
    """(upper, work, index) of a mount.  `overlay`: the kernel-style (upperdir, workdir)
    given instead of a state dir; then the work dir also holds rofs's private files
    (`state` is the work dir), and the index is WORKDIR/.rofs/index."""
    if overlay is not None:
        upper, work = overlay
        return upper, work, os.path.join(work, PRIVATE_DIR, "index")
    return (upper_dir(state, mountpoint), work_dir(state, mountpoint),
            index_dir(state, mountpoint))


def bases_dir(state: str, mountpoint: str) -> str:
    """The base store of a mount (rofs/store/origin.py): one per mount, so that a reconcile,
    which holds that mount's lock, can drop what no origin of the mount refers to."""
    return os.path.join(state, PRIVATE_DIR, "bases", mount_name(mountpoint))


def log_path(state: str, mountpoint: str) -> str:
    """The write log of a mount (rotated copies get .1, .2, ...)."""
    return os.path.join(state, PRIVATE_DIR, "log", mount_name(mountpoint) + ".jsonl")


def _makedirs(path: str, created: list[str], mode: int = 0o755) -> None:
    missing = []
    head = path
    while not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    for directory in reversed(missing):
        os.mkdir(directory, mode)
        created.append(directory)


def _format_line(userxattr: bool) -> str:
    return "rofs-state %d%s\n" % (FORMAT_VERSION, " " + USERXATTR if userxattr else "")


def _parse_format(path: str, text: str) -> Markers:
    """The markers a state dir uses, from its format line ("rofs-state N [userxattr]")."""
    parts = text.split()
    if len(parts) not in (2, 3) or parts[0] != "rofs-state" or not parts[1].isdigit() or \
            parts[2:] not in ([], [USERXATTR]):
        raise StateError("%s: not a rofs state format file (%r)" % (path, text[:40]))
    if int(parts[1]) > FORMAT_VERSION:
        raise StateError("%s: state format %s is newer than this rofs understands (%d)"
                         % (path, parts[1], FORMAT_VERSION))
    return Markers(Markers.USER if parts[2:] else Markers.TRUSTED)


def read_markers(state: str) -> Markers:
    """The markers of an existing state dir (trusted.overlay.* if it has no format file)."""
    path = os.path.join(state, PRIVATE_DIR, FORMAT_FILE)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return _parse_format(path, f.read())
    except FileNotFoundError:
        return Markers()


def _check_format(private: str, created: list[str], userxattr: bool | None) -> Markers:
    """Read (or write, for a new state dir) the format file; the state's markers.

    `userxattr`: whether the markers are user.overlay.* (the kernel's `userxattr`), which
    a user other than root can write; None means: as the state says, and for a new state
    dir, user.overlay.* unless root mounts it."""
    path = os.path.join(private, FORMAT_FILE)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        if userxattr is None:
            userxattr = os.geteuid() != 0
        with open(path + ".tmp", "w", encoding="ascii") as f:
            f.write(_format_line(userxattr))
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
        created.append(path)
        return Markers(Markers.USER if userxattr else Markers.TRUSTED)
    markers = _parse_format(path, text)
    has_user = markers.prefix == Markers.USER
    if userxattr is not None and userxattr != has_user:
        raise StateError("%s: this state dir uses %s markers, not %s" % (
            path, markers.prefix.decode() + "*",
            (Markers.USER if userxattr else Markers.TRUSTED).decode() + "*"))
    if not has_user and os.geteuid() != 0:
        raise StateError("state dir %s holds trusted.overlay.* markers, which only root can "
                         "read and write: mount it as root" % os.path.dirname(private))
    return markers


def probe(work_fd: int, work_path: str, markers: Markers) -> None:
    """Refuse a state filesystem that cannot hold overlay whiteouts and markers."""
    upper = UpperLayer(work_fd, work_fd, markers)
    name = b"#rofs.probe.%d" % os.getpid()
    moved = name + b".moved"
    try:
        upper.remove_tree(work_fd, name)
        upper.remove_tree(work_fd, moved)
        try:
            upper.make_whiteout(work_fd, name)
        except OSError as e:
            raise StateError("state dir %s cannot hold whiteouts (mknod of a 0/0 character "
                             "device: %s)" % (work_path, e.strerror)) from None
        os.unlink(name, dir_fd=work_fd)
        os.mkdir(name, 0o700, dir_fd=work_fd)
        try:
            upper.set_marker(work_fd, name, markers.opaque, b"y")
        except OSError as e:
            raise StateError("state dir %s cannot hold %s xattrs (%s)"
                             % (work_path, markers.prefix.decode(), e.strerror)) from None
        try:
            renameat2(work_fd, name, work_fd, moved, RENAME_WHITEOUT)
        except OSError as e:
            raise StateError("state dir %s does not support rename with whiteout (%s)"
                             % (work_path, e.strerror)) from None
    finally:
        upper.remove_tree(work_fd, name)
        upper.remove_tree(work_fd, moved)


def clean_work(work_fd: int, upper: UpperLayer) -> list[bytes]:
    """Remove what an interrupted operation left in the work dir (never visible)."""
    removed = []
    with os.scandir(work_fd) as entries:
        names = [os.fsencode(e.name) for e in entries]
    for name in names:
        if name.startswith(b"#rofs."):
            upper.remove_tree(work_fd, name)
            removed.append(name)
    return removed


def _rollback(created: list[str]) -> None:
    for path in reversed(created):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:
            pass


def scratch_base(state: str, scratch: str | None) -> str:
    return scratch or os.path.join(state, PRIVATE_DIR, "scratch")


def prepare_scratch(prepared: Prepared, state: str, mountpoint: str, scratch: str | None,
                    markers: Markers) -> None:
    """Set up the scratch layer of a mount, empty: BASE/upper/<mount>/, BASE/work/<mount>/
    and BASE/index/<mount>/, BASE being --scratch DIR or STATE/.rofs/scratch.  Whatever the
    last session left there is deleted first (that is what scratch means)."""
    base = scratch_base(state, scratch)
    name = mount_name(mountpoint)
    upper_path = os.path.join(base, "upper", name)
    work_path = os.path.join(base, "work", name)
    index_path = os.path.join(base, "index", name)
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        check_owner(base, "scratch dir")
        for path in (upper_path, work_path, index_path):
            if os.path.lexists(path):
                remove_path(path)  # what the last session left, of any depth
            os.makedirs(path, mode=0o700)
        upper_fd = os.open(upper_path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW |
                           os.O_CLOEXEC)
        prepared.scratch_upper_fd = upper_fd
        prepared.scratch_work_fd = os.open(work_path, os.O_RDONLY | os.O_DIRECTORY |
                                           os.O_NOFOLLOW | os.O_CLOEXEC)
        prepared.scratch_index_fd = os.open(index_path, os.O_PATH | os.O_DIRECTORY |
                                            os.O_NOFOLLOW | os.O_CLOEXEC)
        if len({os.fstat(fd).st_dev for fd in (upper_fd, prepared.scratch_work_fd,
                                                prepared.scratch_index_fd)}) != 1:
            raise StateError("%s and %s are on different filesystems" % (upper_path,
                                                                         work_path))
        probe(prepared.scratch_work_fd, work_path, markers)
        # The scratch root stands for the mount's root: same owner and mode.
        root = os.fstat(prepared.upper_fd)
        copyup.chown(upper_path, root.st_uid, root.st_gid)
        os.chmod(upper_path, stat.S_IMODE(root.st_mode))
    except OSError as e:
        raise StateError("cannot use scratch dir %s: %s" % (base, e)) from None
    prepared.scratch_path = upper_path


def check_owner(state: str, what: str = "state dir", doing: str = "mounting it") -> None:
    """Refuse a state (or scratch) dir that someone else could have prepared: it must
    belong to the user mounting (root, normally) and not be writable by group or
    others, or anyone able to write there could plant whiteouts, markers or files in
    the merged view."""
    st = os.stat(state)
    if st.st_uid != os.geteuid():
        raise StateError("%s %s belongs to uid %d, not to uid %d %s"
                         % (what, state, st.st_uid, os.geteuid(), doing))
    if st.st_mode & 0o022:
        who = ("group and others" if st.st_mode & 0o022 == 0o022 else
               "group" if st.st_mode & 0o020 else "others")
        raise StateError("%s %s is writable by %s (mode %o): chmod go-w it"
                         % (what, state, who, stat.S_IMODE(st.st_mode)))

def prepare(state: str, mountpoint: str, lower: str,
            overlay: tuple[str, str] | None = None,
            userxattr: bool | None = None) -> Prepared:
    """Open the lower, set up the state dir for this mount, lock it, probe it.
    The markers it uses (see _check_format) are in the result."""
    created: list[str] = []
    lower_fd = upper_fd = work_fd = index_fd = lock_fd = -1
    try:
        # Through a read-only, noatime clone of its mount where allowed (root), so the
        # kernel itself keeps the lower unchanged; else the directory itself.
        lower_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        clone = open_read_only_tree(proc_path(lower_fd))
        if clone is not None:
            os.close(lower_fd)
            lower_fd = clone
        if not os.path.exists(state):
            os.mkdir(state, 0o700)
            created.append(state)
        check_owner(state)
        private = os.path.join(state, PRIVATE_DIR)
        _makedirs(private, created, 0o700)
        markers = _check_format(private, created, userxattr)
        upper_path, work_path, index_path = layer_paths(state, mountpoint, overlay)
        if overlay is not None:
            check_owner(upper_path, "upper dir")
        new_upper = not os.path.lexists(upper_path)
        _makedirs(upper_path, created)
        _makedirs(work_path, created, 0o700)
        _makedirs(index_path, created, 0o700)
        st = os.lstat(upper_path)
        if not stat.S_ISDIR(st.st_mode):
            raise StateError("%s is not a directory" % upper_path)
        upper_fd = os.open(upper_path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW |
                           os.O_CLOEXEC)
        work_fd = os.open(work_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                          os.O_CLOEXEC)
        index_fd = os.open(index_path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW |
                           os.O_CLOEXEC)
        devices = {os.fstat(fd).st_dev for fd in (upper_fd, work_fd, index_fd)}
        if len(devices) != 1:
            raise StateError("%s and %s are on different filesystems" % (upper_path,
                                                                         work_path))
        lock_fd = os.open(upper_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError("%s is in use by another rofs mount" % upper_path) from None
        probe(work_fd, work_path, markers)
        if new_upper:
            # The upper root looks like the lower root (owner, mode, times, xattrs).
            copyup.copy_meta(os.fstat(lower_fd), proc_path(upper_fd), markers.is_private,
                             proc_path(lower_fd))
        clean_work(work_fd, UpperLayer(upper_fd, work_fd, markers))
        bases = bases_dir(state, mountpoint)
        _makedirs(bases, created, 0o700)
        prepared = Prepared(lower_fd, upper_fd, work_fd, index_fd, lock_fd, upper_path,
                            work_path, markers, created)
        lower_fd = upper_fd = work_fd = index_fd = lock_fd = -1  # prepared's now
        try:
            prepared.bases_fd = os.open(bases, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW |
                                        os.O_CLOEXEC)
        except BaseException:
            prepared.close()
            raise
        return prepared
    except BaseException as e:
        for fd in (lower_fd, upper_fd, work_fd, index_fd, lock_fd):
            if fd >= 0:
                os.close(fd)
        _rollback(created)
        if isinstance(e, OSError) and not isinstance(e, StateError):
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC,
                           errno.ENOTDIR, errno.ENOENT):
                raise StateError("cannot use state dir %s: %s" % (state, e)) from None
        raise
