"""POSIX edge cases through a real mount: deep paths, open and cached descendants of a
moved directory, seekdir/telldir, inode numbers, O_TRUNC without a data copy."""

import ctypes
import errno
import os
import stat

import pytest
from helpers import readb

pytestmark = pytest.mark.fuse

NAME = b"x" * 200
DEPTH = 30  # 30 * 201 bytes: well past PATH_MAX (4096)


def make_deep(root_fd: int, depth: int) -> int:
    """mkdirat/openat down `depth` levels; returns an fd of the deepest directory."""
    fd = os.dup(root_fd)
    for _ in range(depth):
        try:
            os.mkdir(NAME, dir_fd=fd)
        except FileExistsError:
            pass
        nxt = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def walk_deep(root_fd: int, depth: int) -> int:
    fd = os.dup(root_fd)
    for _ in range(depth):
        nxt = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


@pytest.fixture
def deep_lower(layers):
    root = os.open(layers["lower"], os.O_RDONLY | os.O_DIRECTORY)
    fd = make_deep(root, DEPTH)
    with open(os.open(b"bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep lower\n")
    os.close(fd)
    os.close(root)
    return layers


def test_paths_deeper_than_path_max(deep_lower, mounted):
    m = mounted
    root = os.open(m["mnt"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = walk_deep(root, DEPTH)
        try:
            # read the lower file, copy it up (parents included), create new files
            with open(os.open(b"bottom", os.O_RDONLY, dir_fd=fd), "rb") as f:
                assert f.read() == b"deep lower\n"
            with open(os.open(b"bottom", os.O_WRONLY | os.O_APPEND, dir_fd=fd), "wb") as f:
                f.write(b"appended\n")
            with open(os.open(b"new", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd), "wb") as f:
                f.write(b"new deep\n")
            os.rename(b"new", b"renamed", src_dir_fd=fd, dst_dir_fd=fd)
            deeper = make_deep(fd, 5)
            os.symlink(b"target", b"link", dir_fd=deeper)
            assert os.readlink(b"link", dir_fd=deeper) == b"target"
            os.close(deeper)
            assert sorted(os.listdir(fd)) == sorted([NAME.decode(), "bottom", "renamed"])
        finally:
            os.close(fd)
    finally:
        os.close(root)
    # the state holds it all, the lower is untouched
    upper = os.open(os.path.join(m["state"], m["mnt"].lstrip("/")), os.O_RDONLY)
    fd = walk_deep(upper, DEPTH)
    assert sorted(os.listdir(fd)) == sorted([NAME.decode(), "bottom", "renamed"])
    os.close(fd)
    os.close(upper)
    lower = os.open(m["lower"], os.O_RDONLY)
    fd = walk_deep(lower, DEPTH)
    with open(os.open(b"bottom", os.O_RDONLY, dir_fd=fd), "rb") as f:
        assert f.read() == b"deep lower\n"
    assert os.listdir(fd) == ["bottom"]
    os.close(fd)
    os.close(lower)


def test_rename_directory_with_open_and_cached_descendants(mounted):
    m = mounted
    base = m["mnt"]
    leaf = os.path.join(base, "d", "sub", "deep", "leaf")
    os.stat(os.path.join(base, "d", "sub"))  # cached by the kernel
    reader = os.open(leaf, os.O_RDONLY)
    writer = os.open(os.path.join(base, "d", "file"), os.O_RDWR)
    cwd_fd = os.open(os.path.join(base, "d", "sub"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(os.path.join(base, "d"), os.path.join(base, "moved"))
        assert os.pread(reader, 100, 0) == b"leaf\n"
        os.pwrite(writer, b"IN", 0)
        assert readb(os.path.join(base, "moved", "file")) == b"IN d\n"
        # relative to a directory fd opened before the move
        with open(os.open(b"created-after-move", os.O_CREAT | os.O_WRONLY, 0o644,
                          dir_fd=cwd_fd), "wb") as f:
            f.write(b"ok")
        assert readb(os.path.join(base, "moved", "sub", "created-after-move")) == b"ok"
        assert os.stat(os.path.join(base, "moved", "sub")).st_ino == os.fstat(cwd_fd).st_ino
        assert not os.path.exists(os.path.join(base, "d"))
        os.rename(os.path.join(base, "moved", "sub"), os.path.join(base, "sub-top"))
        assert readb(os.path.join(base, "sub-top", "deep", "leaf")) == b"leaf\n"
        assert sorted(os.listdir(cwd_fd)) == ["created-after-move", "deep"]
    finally:
        os.close(reader)
        os.close(writer)
        os.close(cwd_fd)


class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


libc = ctypes.CDLL(None, use_errno=True)
libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir.restype = ctypes.POINTER(Dirent)
libc.readdir.argtypes = [ctypes.c_void_p]
libc.telldir.restype = ctypes.c_long
libc.telldir.argtypes = [ctypes.c_void_p]
libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
libc.closedir.argtypes = [ctypes.c_void_p]
libc.rewinddir.argtypes = [ctypes.c_void_p]


def read_entries(dirp, count=None):
    out = []
    while count is None or len(out) < count:
        entry = libc.readdir(dirp)
        if not entry:
            break
        out.append(entry.contents.d_name)
    return out


def test_seekdir_telldir_rewinddir(mounted):
    m = mounted
    d = os.path.join(m["mnt"], "many")
    os.mkdir(d)
    for i in range(600):
        with open(os.path.join(d, "entry-%03d" % i), "w"):
            pass
    dirp = libc.opendir(os.fsencode(d))
    assert dirp
    try:
        head = read_entries(dirp, 250)
        position = libc.telldir(dirp)
        tail = read_entries(dirp)
        libc.seekdir(dirp, position)
        assert read_entries(dirp) == tail
        names = [n for n in head + tail if n not in (b".", b"..")]
        assert len(names) == len(set(names)) == 600
        os.unlink(os.path.join(d, "entry-000"))
        with open(os.path.join(d, "late"), "w"):
            pass
        libc.rewinddir(dirp)  # a fresh listing after rewind
        again = [n for n in read_entries(dirp) if n not in (b".", b"..")]
        assert b"late" in again and b"entry-000" not in again and len(again) == 600
    finally:
        libc.closedir(dirp)


def test_inode_numbers_unique_and_stable_across_copy_up(mounted):
    m = mounted
    seen = {}
    for dirpath, dirnames, filenames in os.walk(m["mnt"]):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            seen.setdefault(st.st_ino, set()).add(path)
    # only the lower hard-linked pair shares a number
    shared = [sorted(paths) for paths in seen.values() if len(paths) > 1]
    assert shared == [[os.path.join(m["mnt"], "passwd"),
                       os.path.join(m["mnt"], "passwd-hardlink")]]
    before = {path: ino for ino, paths in seen.items() for path in paths}
    for path in list(before):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode))  # copy-up
        elif stat.S_ISDIR(st.st_mode):
            os.utime(path)
    assert {path: os.lstat(path).st_ino for path in before} == before


def test_o_trunc_on_big_lower_file_copies_no_data(mounted):
    m = mounted
    path = os.path.join(m["mnt"], "big")
    upper = os.path.join(m["state"], m["mnt"].lstrip("/"), "big")
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        # the upper copy was born empty: no byte of the 3 MiB was ever written (its
        # blocks, if any, hold xattrs: rofs.origin does not fit in an ext4 inode)
        assert os.lstat(upper).st_size == 0 and os.lstat(upper).st_blocks <= 8
        with pytest.raises(OSError) as no_data:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert no_data.value.errno == errno.ENXIO
        os.write(fd, b"short")
    finally:
        os.close(fd)
    assert readb(path) == b"short"


def test_link_count_through_every_name(mounted):
    m = mounted
    names = [os.path.join(m["mnt"], n) for n in ("l1", "d/l2", "ssh/l3")]
    with open(names[0], "w"):
        pass
    for i, name in enumerate(names[1:], start=2):
        os.link(names[0], name)
        assert all(os.lstat(n).st_nlink == i for n in names[:i])
    os.unlink(names[1])
    assert os.lstat(names[0]).st_nlink == os.lstat(names[2]).st_nlink == 2
    os.chmod(names[2], 0o600)
    assert stat.S_IMODE(os.lstat(names[0]).st_mode) == 0o600
    os.chown(names[0], 7, 7)
    assert os.lstat(names[2]).st_uid == 7


def test_deleted_file_held_by_the_kernel_keeps_its_inode(mounted, remount):
    """A file whose last name is removed while the kernel still holds it (here an O_PATH
    descriptor, like a cwd or an open FIFO) stays a live inode: fstat works and shows
    nlink 0, and its number is not given to a new file while it is held (the state
    filesystem would otherwise reuse it and the kernel would confuse the two)."""
    m = mounted
    old = os.path.join(m["mnt"], "old")
    with open(old, "w") as f:
        f.write("old")
    held = os.open(old, os.O_PATH)
    try:
        number = os.fstat(held).st_ino
        os.unlink(old)
        st = os.fstat(held)
        assert (st.st_nlink, st.st_size, st.st_ino) == (0, 3, number)
        created = []
        for i in range(50):
            path = os.path.join(m["mnt"], "new%d" % i)
            with open(path, "w") as f:
                f.write("new %d" % i)
            created.append((path, os.lstat(path).st_ino))
        assert number not in {ino for _, ino in created}
    finally:
        os.close(held)
    m["proc"].stop()
    remount()
    for i, (path, ino) in enumerate(created):
        assert os.lstat(path).st_ino == ino
        assert readb(path) == b"new %d" % i


def test_open_fifo_after_unlink(mounted):
    m = mounted
    os.utime(os.path.join(m["mnt"], "fifo"))  # copied up
    fd = os.open(os.path.join(m["mnt"], "fifo"), os.O_RDWR | os.O_NONBLOCK)
    try:
        os.unlink(os.path.join(m["mnt"], "fifo"))
        st = os.fstat(fd)
        assert stat.S_ISFIFO(st.st_mode) and st.st_nlink == 0
    finally:
        os.close(fd)


def test_unlink_one_name_of_a_lower_hard_link(mounted, remount):
    m = mounted
    os.lstat(os.path.join(m["mnt"], "passwd-hardlink"))
    os.unlink(os.path.join(m["mnt"], "passwd"))
    assert os.lstat(os.path.join(m["mnt"], "passwd-hardlink")).st_nlink == 1
    m["proc"].stop()
    remount()
    assert os.lstat(os.path.join(m["mnt"], "passwd-hardlink")).st_nlink == 1
    assert not os.path.exists(os.path.join(m["mnt"], "passwd"))


def test_names_with_every_byte_value(mounted, remount):
    """Every byte but "/" and NUL in names: created, listed, renamed, removed, and the
    same after a remount (names are bytes end to end, never decoded)."""
    mnt = os.fsencode(mounted["mnt"])
    names = [bytes([b]) * 3 for b in range(1, 256) if b != ord("/")]
    names += [b"\xff\xfe-invalid-utf8", b" leading and trailing ", b"\n\t\r", b"-" * 255]
    for i, name in enumerate(names):
        path = mnt + b"/" + name
        if i % 3 == 0:
            os.mkdir(path)
        else:
            with open(path, "wb") as f:
                f.write(name)
    os.rename(mnt + b"/" + names[1], mnt + b"/" + names[1] + b"-moved")
    os.unlink(mnt + b"/" + names[2])
    expected = set(names) - {names[1], names[2]} | {names[1] + b"-moved"}
    lower_names = set(os.listdir(os.fsencode(mounted["lower"])))
    assert set(os.listdir(mnt)) == expected | lower_names
    mounted["proc"].stop()
    remount()
    assert set(os.listdir(mnt)) == expected | lower_names
    for name in expected - {names[1] + b"-moved"}:
        path = mnt + b"/" + name
        if not os.path.isdir(path):
            with open(path, "rb") as f:
                assert f.read() == name


def test_moving_a_lower_dir_without_redirects_is_exdev_before_enotempty(layers,
                                                                       kernel_overlay):
    """Found by the differential test (userxattr): renaming a lower directory over a
    non-empty one, with no redirects, is EXDEV on the kernel (it checks whether the
    source can move first) and was ENOTEMPTY on rofs."""
    import errno

    from helpers import RofsProcess
    lower = layers["lower"]
    os.makedirs(os.path.join(lower, "full", "inside"))
    results = []
    with RofsProcess(layers["mnt"], layers["state"], lower, ("-o", "redirect_dir=off")):
        with pytest.raises(OSError) as e:
            os.rename(os.path.join(layers["mnt"], "d"), os.path.join(layers["mnt"], "full"))
        results.append(e.value.errno)
    base = str(layers["tmp"])
    upper, work, merged = (os.path.join(base, n) for n in ("ku", "kw", "km"))
    for path in (upper, work, merged):
        os.mkdir(path)
    kernel_overlay(lower, upper, work, merged, extra="redirect_dir=off")
    with pytest.raises(OSError) as e:
        os.rename(os.path.join(merged, "d"), os.path.join(merged, "full"))
    results.append(e.value.errno)
    assert results == [errno.EXDEV, errno.EXDEV]
