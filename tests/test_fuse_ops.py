"""Every operation through a real rofs mount, including its error cases."""

import ctypes
import errno
import mmap
import os
import stat
import subprocess

import pytest
from helpers import manifest, read_lower, read_text, readb

pytestmark = pytest.mark.fuse

libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
AT_FDCWD = -100


def renameat2(old, new, flags):
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def touch(path, mode="w"):
    with open(path, mode):
        pass


def p(m, *names):
    return os.path.join(m["mnt"], *names)


def upper(m, *names):
    return os.path.join(m["state"], m["mnt"].lstrip("/"), *names)


@pytest.fixture
def m(mounted):
    before = manifest(mounted["lower"])
    yield mounted
    assert manifest(mounted["lower"]) == before, "the lower layer was modified"


# ------------------------------------------------------------------ reads


def test_read_through(m):
    with open(p(m, "passwd")) as f:
        assert f.read() == "root:x:0:0:root:/root:/bin/bash\n"
    assert sorted(os.listdir(p(m, "d"))) == ["file", "sub"]
    assert os.readlink(p(m, "link")) == "passwd"
    assert os.readlink(p(m, "rootlink")) == "/"
    st = os.lstat(p(m, "d", "file"))
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 2345, 2_000_000_000)
    assert stat.S_IMODE(os.lstat(p(m, "d", "sub")).st_mode) == 0o751
    assert stat.S_ISFIFO(os.lstat(p(m, "fifo")).st_mode)
    assert os.getxattr(p(m, "passwd"), "user.note") == b"lower"


def test_lookup_errors(m):
    with pytest.raises(FileNotFoundError):
        os.lstat(p(m, "nope"))
    with pytest.raises(NotADirectoryError):
        os.lstat(p(m, "passwd", "x"))
    with pytest.raises(OSError) as e:
        os.lstat(p(m, "a" * 256))
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        open(p(m, "b" * 256), "w")
    assert e.value.errno == errno.ENAMETOOLONG


def test_name_of_255_bytes(m):
    name = "n" * 255
    with open(p(m, name), "w") as f:
        f.write("ok")
    assert name in os.listdir(m["mnt"])
    os.rename(p(m, name), p(m, "d", name))
    assert read_text(p(m, "d", name)) == "ok"


def test_non_utf8_names(m):
    root = os.fsencode(m["mnt"])
    assert b"caf\xe9" in os.listdir(root)
    name = b"\xff\xfe raw \x01"
    with open(os.path.join(root, name), "wb") as f:
        f.write(b"bytes")
    assert name in os.listdir(root)
    os.rename(os.path.join(root, b"caf\xe9"), os.path.join(root, b"caf\xc3\xa9"))
    assert b"caf\xe9" not in os.listdir(root)
    assert readb(os.path.join(root, b"caf\xc3\xa9")) == b"latin-1 name\n"


# ----------------------------------------------------------------- writes


def test_write_copies_up_atomically_with_metadata(m):
    before = os.lstat(p(m, "d", "file"))
    with open(p(m, "d", "file"), "a") as f:
        f.write("more\n")
    after = os.lstat(p(m, "d", "file"))
    assert read_text(p(m, "d", "file")) == "in d\nmore\n"
    assert read_lower(os.path.join(m["lower"], "d", "file")) == b"in d\n"
    assert after.st_ino == before.st_ino  # stable across copy-up
    assert (after.st_uid, after.st_gid) == (1234, 2345)
    assert os.path.isfile(upper(m, "d", "file"))
    # parents were copied up with their metadata and xattrs
    assert os.getxattr(upper(m, "d"), "trusted.mark") == b"dir"
    assert stat.S_IMODE(os.lstat(upper(m, "d")).st_mode) == stat.S_IMODE(
        os.lstat(os.path.join(m["lower"], "d")).st_mode)
    assert os.listdir(os.path.join(m["state"], ".rofs", "work", m["mnt"].lstrip("/"))) == []


def test_copy_up_keeps_xattrs_and_big_content(m):
    os.chmod(p(m, "passwd"), 0o640)
    assert os.getxattr(p(m, "passwd"), "user.note") == b"lower"
    assert stat.S_IMODE(os.lstat(p(m, "passwd")).st_mode) == 0o640
    lower_big = read_lower(os.path.join(m["lower"], "big"))
    with open(p(m, "big"), "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X")
    data = readb(p(m, "big"))
    assert len(data) == len(lower_big)
    assert data[: 1 << 20] == lower_big[: 1 << 20] and data[(1 << 20) + 1:] == lower_big[
        (1 << 20) + 1:]


def test_truncate_and_o_trunc(m):
    os.truncate(p(m, "big"), 10)
    assert os.path.getsize(p(m, "big")) == 10
    with open(p(m, "shadow"), "w") as f:  # O_TRUNC on a lower file
        f.write("new\n")
    assert read_text(p(m, "shadow")) == "new\n"
    assert stat.S_IMODE(os.lstat(p(m, "shadow")).st_mode) == 0o600
    fd = os.open(p(m, "d", "file"), os.O_RDWR)
    try:
        os.ftruncate(fd, 2)
    finally:
        os.close(fd)
    assert read_text(p(m, "d", "file")) == "in"


def test_create_exclusive_append(m):
    fd = os.open(p(m, "newfile"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(p(m, "newfile"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(FileExistsError):
        os.open(p(m, "passwd"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(p(m, "newfile"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.close(fd)
    assert readb(p(m, "newfile")) == b"abcdef"
    st = os.lstat(p(m, "newfile"))
    assert stat.S_IMODE(st.st_mode) == 0o640  # the caller's mode (umask 022 keeps it)


def test_chmod_chown_utimens(m):
    os.chmod(p(m, "d", "file"), 0o4711)
    os.chown(p(m, "d", "file"), 42, 43)
    os.chmod(p(m, "d", "file"), 0o4711)
    os.utime(p(m, "d", "file"), ns=(5_000_000_000, 6_000_000_000))
    st = os.lstat(p(m, "d", "file"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4711, 42, 43)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_000, 6_000_000_000)
    os.utime(p(m, "d", "file"))  # UTIME_NOW
    assert os.lstat(p(m, "d", "file")).st_mtime_ns > 6_000_000_000
    os.chown(p(m, "link"), 7, 8, follow_symlinks=False)
    st = os.lstat(p(m, "link"))
    assert (st.st_uid, st.st_gid) == (7, 8)
    assert os.readlink(p(m, "link")) == "passwd"
    assert os.lstat(p(m, "passwd")).st_uid == 0


def test_mmap_shared_write_after_copy_up(m):
    with open(p(m, "d", "file"), "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as mm:
            mm[0:2] = b"IN"
            mm.flush()
    assert readb(p(m, "d", "file")) == b"IN d\n"
    assert readb(upper(m, "d", "file")) == b"IN d\n"


def test_reader_opened_before_copy_up_sees_new_data(m):
    reader = os.open(p(m, "d", "file"), os.O_RDONLY)
    try:
        with open(p(m, "d", "file"), "r+") as f:
            f.write("XY")
        assert os.pread(reader, 100, 0) == b"XY d\n"
    finally:
        os.close(reader)


# ----------------------------------------------------------- names & dirs


def test_mkdir_rmdir_mkdir_comes_back_empty(m):
    assert os.listdir(p(m, "d", "sub")) == ["deep"]
    with pytest.raises(OSError) as e:
        os.rmdir(p(m, "d", "sub"))
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(p(m, "d", "sub", "deep", "leaf"))
    os.rmdir(p(m, "d", "sub", "deep"))
    os.rmdir(p(m, "d", "sub"))
    assert not os.path.exists(p(m, "d", "sub"))
    os.mkdir(p(m, "d", "sub"), 0o700)
    assert os.listdir(p(m, "d", "sub")) == []
    assert stat.S_IMODE(os.lstat(p(m, "d", "sub")).st_mode) == 0o700
    assert os.getxattr(upper(m, "d", "sub"), "trusted.overlay.opaque") == b"y"
    with pytest.raises(FileExistsError):
        os.mkdir(p(m, "d", "sub"))
    with pytest.raises(FileExistsError):
        os.mkdir(p(m, "ssh"))
    with pytest.raises(NotADirectoryError):
        os.rmdir(p(m, "passwd"))
    with pytest.raises(FileNotFoundError):
        os.rmdir(p(m, "nothing"))


def test_unlink_lower_leaves_whiteout(m):
    os.unlink(p(m, "shadow"))
    assert "shadow" not in os.listdir(m["mnt"])
    st = os.lstat(upper(m, "shadow"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    with pytest.raises(FileNotFoundError):
        os.unlink(p(m, "shadow"))
    with pytest.raises(IsADirectoryError):
        os.unlink(p(m, "d"))
    with open(p(m, "shadow"), "w") as f:  # create over the whiteout
        f.write("back\n")
    assert read_text(p(m, "shadow")) == "back\n"
    assert stat.S_ISREG(os.lstat(upper(m, "shadow")).st_mode)


def test_symlink_and_replace(m):
    os.symlink("/etc/hosts", p(m, "newlink"))
    assert os.readlink(p(m, "newlink")) == "/etc/hosts"
    subprocess.run(["ln", "-sfn", "shadow", p(m, "link")], check=True)
    assert os.readlink(p(m, "link")) == "shadow"
    with pytest.raises(FileExistsError):
        os.symlink("x", p(m, "passwd"))


def test_mknod_fifo_socket_device(m):
    os.mkfifo(p(m, "newfifo"), 0o620)
    assert stat.S_ISFIFO(os.lstat(p(m, "newfifo")).st_mode)
    os.mknod(p(m, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(p(m, "null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(p(m, "sock"))
        assert stat.S_ISSOCK(os.lstat(p(m, "sock")).st_mode)
    finally:
        s.close()
    with pytest.raises(FileExistsError):
        os.mkfifo(p(m, "fifo"))


def test_rename_file_over_lower_file_passwd_style(m):
    ino_before = os.lstat(p(m, "shadow")).st_ino
    with open(p(m, "nshadow"), "w") as f:
        f.write("root:$6$new:19000:0:99999:7:::\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(p(m, "nshadow"), p(m, "shadow"))
    assert read_text(p(m, "shadow")).startswith("root:$6$new")
    assert "nshadow" not in os.listdir(m["mnt"])
    assert os.lstat(p(m, "shadow")).st_ino != ino_before


def test_rename_lower_file_leaves_whiteout(m):
    os.rename(p(m, "passwd"), p(m, "passwd.old"))
    assert not os.path.exists(p(m, "passwd"))
    assert read_text(p(m, "passwd.old")).startswith("root:")
    assert stat.S_ISCHR(os.lstat(upper(m, "passwd")).st_mode)


def test_rename_directory_with_lower_content_no_exdev(m):
    ino = os.lstat(p(m, "d")).st_ino
    os.rename(p(m, "d"), p(m, "moved"))
    assert not os.path.exists(p(m, "d"))
    assert read_text(p(m, "moved", "sub", "deep", "leaf")) == "leaf\n"
    assert os.lstat(p(m, "moved")).st_ino == ino
    os.rename(p(m, "moved"), p(m, "ssh", "nested"))
    assert read_text(p(m, "ssh", "nested", "file")) == "in d\n"
    # renaming back where it came from works too
    os.rename(p(m, "ssh", "nested"), p(m, "d"))
    assert sorted(os.listdir(p(m, "d"))) == ["file", "sub"]


def test_rename_dir_over_empty_dir_and_errors(m):
    os.mkdir(p(m, "target"))
    os.rename(p(m, "d"), p(m, "target"))
    assert sorted(os.listdir(p(m, "target"))) == ["file", "sub"]
    with pytest.raises(OSError) as e:
        os.rename(p(m, "ssh"), p(m, "target"))
    assert e.value.errno == errno.ENOTEMPTY
    # over a lower dir made empty: nothing of its lower content may show through
    os.unlink(p(m, "ssh", "sshd_config"))
    os.mkdir(p(m, "fresh"))
    os.rename(p(m, "fresh"), p(m, "ssh"))
    assert os.listdir(p(m, "ssh")) == []
    with pytest.raises(NotADirectoryError):
        os.rename(p(m, "target"), p(m, "passwd"))
    with pytest.raises(IsADirectoryError):
        os.rename(p(m, "passwd"), p(m, "target"))
    with pytest.raises(OSError) as e:
        os.rename(p(m, "target"), p(m, "target", "sub", "x"))
    assert e.value.errno == errno.EINVAL


def test_rename_over_whiteout_with_directory(m):
    os.unlink(p(m, "shadow"))
    os.mkdir(p(m, "newdir"))
    open(p(m, "newdir", "x"), "w").close()
    os.rename(p(m, "newdir"), p(m, "shadow"))
    assert os.listdir(p(m, "shadow")) == ["x"]


def test_rename_noreplace_and_exchange(m):
    with pytest.raises(FileExistsError):
        renameat2(p(m, "passwd"), p(m, "shadow"), 1)
    renameat2(p(m, "passwd"), p(m, "fresh-name"), 1)
    assert read_text(p(m, "fresh-name")).startswith("root:x")
    renameat2(p(m, "fresh-name"), p(m, "shadow"), 2)
    assert read_text(p(m, "shadow")).startswith("root:x")
    assert read_text(p(m, "fresh-name")).startswith("root:*")
    renameat2(p(m, "d"), p(m, "shadow"), 2)  # a directory with a file
    assert os.path.isdir(p(m, "shadow")) and os.path.isfile(p(m, "d"))
    assert read_text(p(m, "shadow", "sub", "deep", "leaf")) == "leaf\n"
    with pytest.raises(FileNotFoundError):
        renameat2(p(m, "d"), p(m, "missing"), 2)


def test_hard_links_stay_one_inode(m):
    """shadow-utils' lock protocol: link passwd.PID to passwd.lock, then st_nlink == 2."""
    with open(p(m, "passwd.123"), "w") as f:
        f.write("123")
    os.link(p(m, "passwd.123"), p(m, "passwd.lock"))
    assert os.lstat(p(m, "passwd.123")).st_nlink == 2
    assert os.lstat(p(m, "passwd.lock")).st_nlink == 2
    assert os.lstat(p(m, "passwd.lock")).st_ino == os.lstat(p(m, "passwd.123")).st_ino
    with pytest.raises(FileExistsError):
        os.link(p(m, "passwd.123"), p(m, "passwd.lock"))
    os.unlink(p(m, "passwd.123"))
    assert os.lstat(p(m, "passwd.lock")).st_nlink == 1
    # link of a lower file: copy-up, both names one inode, content shared
    os.link(p(m, "d", "file"), p(m, "file-link"))
    a, b = os.lstat(p(m, "d", "file")), os.lstat(p(m, "file-link"))
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    with open(p(m, "file-link"), "a") as f:
        f.write("via link\n")
    assert read_text(p(m, "d", "file")) == "in d\nvia link\n"
    with pytest.raises(PermissionError):
        os.link(p(m, "d"), p(m, "dirlink"))


def test_lower_hard_links_copy_up_together(m):
    assert os.lstat(p(m, "passwd")).st_ino == os.lstat(p(m, "passwd-hardlink")).st_ino
    with open(p(m, "passwd"), "a") as f:
        f.write("x\n")
    assert read_text(p(m, "passwd-hardlink")).endswith("x\n")
    assert os.lstat(p(m, "passwd")).st_ino == os.lstat(p(m, "passwd-hardlink")).st_ino


def test_open_unlink_fstat(m):
    fd = os.open(p(m, "d", "file"), os.O_RDWR)
    try:
        os.unlink(p(m, "d", "file"))
        st = os.fstat(fd)
        assert st.st_nlink == 0
        os.write(fd, b"still writable")
        assert os.pread(fd, 100, 0).startswith(b"still writable")
    finally:
        os.close(fd)
    fd = os.open(p(m, "created"), os.O_CREAT | os.O_RDWR)
    try:
        os.unlink(p(m, "created"))
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_xattrs(m):
    os.setxattr(p(m, "shadow"), "user.a", b"1")
    assert os.getxattr(p(m, "shadow"), "user.a") == b"1"
    assert "user.a" in os.listxattr(p(m, "shadow"))
    os.removexattr(p(m, "shadow"), "user.a")
    with pytest.raises(OSError) as e:
        os.getxattr(p(m, "shadow"), "user.a")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.removexattr(p(m, "passwd"), "user.missing")
    assert e.value.errno == errno.ENODATA
    assert not os.path.exists(upper(m, "passwd"))  # no copy-up for a failed removal
    os.removexattr(p(m, "passwd"), "user.note")
    assert "user.note" not in os.listxattr(p(m, "passwd"))
    assert os.getxattr(os.path.join(m["lower"], "passwd"), "user.note") == b"lower"


def test_setxattr_create_and_replace_flags(m):
    """XATTR_CREATE and XATTR_REPLACE reach the state (pyfuse3 dropped them)."""
    with pytest.raises(OSError) as e:
        os.setxattr(p(m, "passwd"), "user.note", b"x", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        os.setxattr(p(m, "passwd"), "user.absent", b"x", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(p(m, "passwd"), "user.note", b"new", os.XATTR_REPLACE)
    os.setxattr(p(m, "passwd"), "user.fresh", b"1", os.XATTR_CREATE)
    assert os.getxattr(p(m, "passwd"), "user.note") == b"new"
    assert os.getxattr(upper(m, "passwd"), "user.fresh") == b"1"


def test_markers_are_hidden_and_refused(m):
    """The markers are on disk, and through the mount none can be listed, read or set
    (EOPNOTSUPP, as overlayfs answers for its own), whatever the namespace."""
    os.rename(p(m, "d"), p(m, "moved"))  # gets a redirect marker
    os.chmod(p(m, "passwd"), 0o640)  # a copy-up: a rofs.ino marker
    on_disk = {n for path in (upper(m, "moved"), upper(m, "passwd"))
               for n in os.listxattr(path)}
    assert {"trusted.overlay.redirect", "trusted.overlay.rofs.ino"} <= on_disk, on_disk
    for path in (p(m, "moved"), p(m, "passwd")):
        assert not [n for n in os.listxattr(path) if ".overlay." in n]
    for marker in ("trusted.overlay.redirect", "trusted.overlay.rofs.ino",
                   "trusted.overlay.opaque", "user.overlay.opaque", "trusted.overlay.whatever"):
        for call, args in ((os.setxattr, (p(m, "moved"), marker, b"y")),
                           (os.getxattr, (p(m, "moved"), marker)),
                           (os.getxattr, (p(m, "passwd"), marker))):
            with pytest.raises(OSError) as e:
                call(*args)
            assert e.value.errno == errno.EOPNOTSUPP, marker
    assert os.getxattr(upper(m, "moved"), "trusted.overlay.redirect") == b"/d"


def test_readdir_large_and_stable_under_changes(m):
    os.mkdir(p(m, "many"))
    for i in range(1500):
        open(p(m, "many", "f%04d" % i), "w").close()
    names = set(os.listdir(p(m, "many")))
    assert len(names) == 1500
    # remove and add while iterating: nothing present throughout is missed or doubled
    seen = []
    with os.scandir(p(m, "many")) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 10:
                for j in range(0, 1500, 2):
                    if "f%04d" % j != entry.name:
                        try:
                            os.unlink(p(m, "many", "f%04d" % j))
                        except FileNotFoundError:
                            pass
                for j in range(100):
                    open(p(m, "many", "new%d" % j), "w").close()
    assert len(seen) == len(set(seen))
    for j in range(1, 1500, 2):
        assert "f%04d" % j in seen


def test_statfs_fsync_and_access(layers):
    """fsync, fdatasync and a directory's fsync reach the daemon (a "no exception" check
    would pass with ENOSYS from it too); access(2) is the kernel's (default_permissions)
    and never reaches it."""
    from helpers import RofsProcess
    m = {**layers}
    proc = RofsProcess(m["mnt"], m["state"], m["lower"], args=("--debug",))
    with proc:
        st = os.statvfs(m["mnt"])
        assert st.f_bsize > 0 and st.f_namemax == 255
        fd = os.open(p(m, "d", "file"), os.O_RDWR)
        try:
            os.write(fd, b"z")
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        dfd = os.open(p(m, "d"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        assert os.access(p(m, "passwd"), os.R_OK | os.W_OK)
        assert not os.access(p(m, "passwd"), os.X_OK)
        assert os.access(p(m, "d"), os.X_OK)
    out = proc.output()
    calls = [line.split("rofs.fuse.session: ", 1)[1].split("(")[0]
             for line in out.splitlines() if "rofs.fuse.session: " in line and "(" in line]
    assert calls.count("fsync") == 2 and calls.count("fsyncdir") == 1, out
    assert "statfs" in calls and "access" not in calls, out


def test_inode_numbers_stable_across_remount(mounted, remount):
    m = mounted
    paths = ["passwd", "d", "d/sub", "d/file", "link"]
    before = {x: os.lstat(p(m, x)).st_ino for x in paths}
    with open(p(m, "d", "file"), "a") as f:
        f.write("copied up\n")
    os.chmod(p(m, "d", "sub"), 0o755)
    open(p(m, "newfile"), "w").close()
    before["newfile"] = os.lstat(p(m, "newfile")).st_ino
    assert {x: os.lstat(p(m, x)).st_ino for x in paths} == {x: before[x] for x in paths}
    m["proc"].stop()
    remount()
    after = {x: os.lstat(p(m, x)).st_ino for x in before}
    assert after == before
    assert len(set(after.values())) == len(after)


def test_lower_hard_link_met_after_copy_up_shares_the_copy(mounted, remount):
    """Copy-up through one name while the other lower name is unknown; after a remount
    the other name is looked up for the first time and is still the same inode."""
    m = mounted
    with open(p(m, "passwd"), "a") as f:
        f.write("new\n")
    assert os.lstat(p(m, "passwd")).st_nlink == 2
    index = os.path.join(m["state"], ".rofs", "index", m["mnt"].lstrip("/"))
    assert len(os.listdir(index)) == 1
    m["proc"].stop()
    remount()
    alias, name = os.lstat(p(m, "passwd-hardlink")), os.lstat(p(m, "passwd"))
    assert alias.st_ino == name.st_ino and alias.st_nlink == name.st_nlink == 2
    assert read_text(p(m, "passwd-hardlink")).endswith("new\n")
    assert os.listdir(index) == []  # every name is in the upper layer now
    with open(p(m, "passwd-hardlink"), "a") as f:
        f.write("via alias\n")
    assert read_text(p(m, "passwd")).endswith("via alias\n")


def test_fallocate_reaches_the_upper_copy(m):
    """posix_fallocate and fallocate's modes (pyfuse3 had no FALLOCATE: EOPNOTSUPP)."""
    import ctypes
    fd = os.open(p(m, "passwd"), os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        libc = ctypes.CDLL(None, use_errno=True)
        punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        assert libc.fallocate(fd, punch, ctypes.c_int64(0), ctypes.c_int64(4096)) == 0, \
            os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    assert os.stat(p(m, "passwd")).st_size == 1 << 20
    assert os.stat(upper(m, "passwd")).st_size == 1 << 20
    assert readb(p(m, "passwd"))[:4096] == bytes(4096)
    assert os.stat(os.path.join(m["lower"], "passwd")).st_size < 4096


def test_seek_data_and_hole_and_copy_file_range_reach_rofs(layers):
    """SEEK_DATA/SEEK_HOLE see the holes of the file underneath (the kernel's own
    fallback calls a whole file data), and copy_file_range is one request to rofs, which
    copies in the layers, rather than a read and write loop through the daemon."""
    from helpers import RofsProcess
    sparse = os.path.join(layers["lower"], "sparse")
    with open(sparse, "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"data" * 1024)
    fd = os.open(sparse, os.O_RDONLY)
    try:
        data_at = os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)
    if data_at == 0:
        pytest.skip("the filesystem under the tests keeps no holes")
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"], args=("--debug",))
    with proc:
        fd = os.open(os.path.join(layers["mnt"], "sparse"), os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == data_at
            hole = os.lseek(fd, data_at, os.SEEK_HOLE)
            assert data_at < hole < 4 << 20
            with pytest.raises(OSError) as e:
                os.lseek(fd, 4 << 20, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
            out = os.open(os.path.join(layers["mnt"], "copy"),
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                copied = 0
                while copied < 4 << 20:
                    n = os.copy_file_range(fd, out, (4 << 20) - copied, copied, copied)
                    assert n > 0
                    copied += n
            finally:
                os.close(out)
        finally:
            os.close(fd)
        assert readb(os.path.join(layers["mnt"], "copy")) == read_lower(sparse)
    output = proc.output()
    assert "lseek(" in output and "copy_file_range(" in output, output
    assert "write(" not in output.split("copy_file_range(", 1)[1], output


def test_the_daemon_reaches_the_lower_through_a_read_only_noatime_mount(m):
    """rofs reaches the lower through a private clone of its mount made read-only and
    noatime: the kernel itself refuses any write there, whatever rofs's code does with
    a lower descriptor, and no read touches an atime."""
    pid = m["proc"].server()
    lower = os.path.realpath(m["lower"])
    os.stat(p(m, "d", "file"))  # a lower directory opened below the root too
    reached = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        link = "/proc/%d/fd/%s" % (pid, fd)
        try:
            st = os.stat(link)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_dev != os.stat(lower).st_dev:
            continue
        if not os.path.exists(os.path.join(link, "passwd")) and \
                not os.path.exists(os.path.join(link, "file")):
            continue  # a directory of the state, not of the lower
        if os.path.samestat(st, os.stat(m["state"])) or \
                os.readlink(link).startswith(os.path.realpath(m["state"])):
            continue
        reached += 1
        with pytest.raises(OSError) as e:
            os.mkdir(os.path.join(link, "never"))
        assert e.value.errno == errno.EROFS, link
        assert os.statvfs(link).f_flag & (os.ST_RDONLY | os.ST_NOATIME) == \
            os.ST_RDONLY | os.ST_NOATIME, link
    assert reached >= 2


def test_a_descriptor_counts_the_names_its_file_has_left(m):
    """Unlinking one name of a lower hard link (copied up and indexed): the other name,
    not looked up yet, still counts, and is the same inode when looked up, as on kernel
    overlayfs with index=on (rofs said 0, then gave the other name a number of its own)."""
    fd = os.open(p(m, "passwd"), os.O_RDONLY)
    try:
        os.unlink(p(m, "passwd"))
        assert os.fstat(fd).st_nlink == 1
        assert os.stat(p(m, "passwd-hardlink")).st_nlink == 1
        assert os.fstat(fd).st_ino == os.stat(p(m, "passwd-hardlink")).st_ino
        os.unlink(p(m, "passwd-hardlink"))
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_listings_start_with_dot_and_dot_dot(m):
    """`ls -a` shows . and .. first, as on every other filesystem (rofs listed neither);
    readdir's d_ino of .. is the parent's."""
    out = subprocess.run(["ls", "-a1", p(m, "d")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[:2] == [".", ".."] and sorted(out[2:]) == ["file", "sub"]
    inos = subprocess.run(["ls", "-ai1", p(m, "d")], capture_output=True, text=True,
                          check=True).stdout.split()
    by_name = dict(zip(inos[1::2], inos[0::2], strict=True))
    assert int(by_name["."]) == os.stat(p(m, "d")).st_ino
    assert int(by_name[".."]) == os.stat(m["mnt"]).st_ino


# ------------------------------------------------ fields decoded as the kernel means them


def outcome(call, *args, **kw):
    """What call(*args) gave: ("ok", its value) or ("err", errno name); never a
    traceback."""
    try:
        return "ok", call(*args, **kw)
    except OSError as e:
        return "err", errno.errorcode.get(e.errno, e.errno)


def test_signed_fields_answer_as_the_filesystem_underneath(m, tmp_path):
    """loff_t and time fields are signed in the kernel: lseek(-1, SEEK_DATA) was decoded
    as 2**64 - 1, Python raised OverflowError, the caller got EIO and the log a
    traceback (an unprivileged log flood); a time before 1970 the same.  The directory
    under the tests (a native filesystem) is the oracle, for a lower file and a copy."""
    native = tmp_path / "native"
    native.write_bytes(b"x" * 10000)
    with open(p(m, "passwd"), "ab") as f:  # a copied-up file
        f.write(b"more\n")
    for path in (p(m, "big"), p(m, "passwd"), str(native)):
        fd = os.open(path, os.O_RDONLY)
        try:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                for offset in (-1, -(1 << 63), (1 << 63) - 1):
                    assert outcome(os.lseek, fd, offset, whence) == ("err", "ENXIO"), \
                        (path, offset, whence)
        finally:
            os.close(fd)
    for when in (-1, -86400 * 365 * 20, -(1 << 40), 1 << 40):
        seen = []
        for path in (p(m, "shadow"), str(native)):
            result = outcome(os.utime, path, ns=(when * 10**9, when * 10**9))
            st = os.stat(path)
            seen.append((result, st.st_mtime_ns, st.st_atime_ns))
        assert seen[0] == seen[1], when
