"""Modes are enforced for every user, and what a user creates belongs to that user."""

import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import build_lower
from helpers import RofsProcess

pytestmark = pytest.mark.fuse

NOBODY = 65534


def as_user(uid, *cmd, gid=None):
    gid = uid if gid is None else gid
    return subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(gid),
                           "--clear-groups", "--", *cmd], capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def public():
    """Layers under a directory every uid can traverse (pytest's tmp dirs are 0700)."""
    base = tempfile.mkdtemp(prefix="rofs-perm-", dir="/tmp")
    os.chmod(base, 0o755)
    lower = os.path.join(base, "lower")
    os.mkdir(lower)
    build_lower(lower)
    os.chmod(lower, 0o755)
    os.mkdir(os.path.join(lower, "pub"))
    os.chmod(os.path.join(lower, "pub"), 0o1777)
    os.mkdir(os.path.join(lower, "grp"))
    os.chown(os.path.join(lower, "grp"), 0, 4242)
    os.chmod(os.path.join(lower, "grp"), 0o2777)
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    proc = RofsProcess(mnt, os.path.join(base, "state"), lower)
    proc.start()
    try:
        yield {"mnt": mnt, "lower": lower, "state": os.path.join(base, "state")}
    finally:
        proc.stop()
        shutil.rmtree(base)
    assert not proc.internal_errors(), proc.output()


def test_cannot_read_0600_root_file(public):
    result = as_user(NOBODY, "cat", os.path.join(public["mnt"], "shadow"))
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert as_user(NOBODY, "cat", os.path.join(public["mnt"], "passwd")).returncode == 0


def test_cannot_write_into_root_dir_or_file(public):
    result = as_user(NOBODY, "touch", os.path.join(public["mnt"], "d", "new"))
    assert result.returncode != 0 and "Permission denied" in result.stderr
    result = as_user(NOBODY, "sh", "-c", "echo x >> %s" % os.path.join(public["mnt"], "passwd"))
    assert result.returncode != 0
    result = as_user(NOBODY, "rm", "-f", os.path.join(public["mnt"], "d", "file"))
    assert result.returncode != 0
    assert result.returncode != 0 and not os.path.exists(
        os.path.join(public["state"], public["mnt"].lstrip("/"), "passwd"))


def test_created_files_belong_to_the_caller(public):
    path = os.path.join(public["mnt"], "pub", "mine")
    result = as_user(NOBODY, "sh", "-c", "umask 022; echo hi > %s; mkdir %s.d" % (path, path))
    assert result.returncode == 0, result.stderr
    for p in (path, path + ".d"):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert os.lstat(path).st_mode & 0o777 == 0o644
    upper = os.path.join(public["state"], public["mnt"].lstrip("/"), "pub", "mine")
    assert os.lstat(upper).st_uid == NOBODY


def test_setgid_directory_and_sticky_bit(public):
    path = os.path.join(public["mnt"], "grp")
    result = as_user(NOBODY, "sh", "-c", "touch %s/f && mkdir %s/sub" % (path, path))
    assert result.returncode == 0, result.stderr
    assert os.lstat(os.path.join(path, "f")).st_gid == 4242
    sub = os.lstat(os.path.join(path, "sub"))
    assert sub.st_gid == 4242 and sub.st_mode & 0o2000
    # sticky /pub: root's file there cannot be removed by another user
    with open(os.path.join(public["mnt"], "pub", "roots"), "w"):
        pass
    result = as_user(NOBODY, "rm", "-f", os.path.join(public["mnt"], "pub", "roots"))
    assert result.returncode != 0
    assert os.path.exists(os.path.join(public["mnt"], "pub", "roots"))


def test_chmod_by_non_owner_refused(public):
    result = as_user(NOBODY, "chmod", "666", os.path.join(public["mnt"], "passwd"))
    assert result.returncode != 0
    assert os.lstat(os.path.join(public["mnt"], "passwd")).st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- hostile users


PY = "/usr/bin/python3"


def py_as(uid, code, *args):
    return as_user(uid, PY, "-c", code, *args)


def test_overlay_markers_cannot_be_set_or_read_through_the_mount(public):
    """Neither trusted.overlay.* nor user.overlay.* (the kernel's `userxattr` markers)
    can be set, removed or read through the mount: no forged whiteout, opaque
    directory or redirect, whichever way the state is mounted later."""
    mnt = public["mnt"]
    mine = os.path.join(mnt, "pub", "mine")
    as_user(1000, "mkdir", os.path.join(mnt, "pub", "minedir"))
    as_user(1000, "touch", mine)
    code = """
import os, sys, errno
for path in sys.argv[1:]:
    for name in ("user.overlay.opaque", "user.overlay.redirect", "trusted.overlay.opaque"):
        try:
            os.setxattr(path, name, b"y")
        except OSError as e:
            print(name, errno.errorcode[e.errno])
        else:
            print(name, "SET")
"""
    out = py_as(1000, code, mine, os.path.join(mnt, "pub", "minedir")).stdout.split("\n")
    assert "SET" not in "\n".join(out), out
    assert out.count("user.overlay.opaque ENOTSUP") == 2  # errno 95, like overlayfs
    assert out.count("trusted.overlay.opaque EPERM") == 2  # the kernel: CAP_SYS_ADMIN
    # root cannot either, and never sees them
    for name in ("trusted.overlay.opaque", "user.overlay.opaque", "trusted.overlay.rofs.ino"):
        with pytest.raises(OSError):
            os.setxattr(mine, name, b"y")
    os.chmod(os.path.join(mnt, "passwd"), 0o644)  # a copy-up: it gets a rofs.ino marker
    assert not [n for n in os.listxattr(os.path.join(mnt, "passwd")) if "overlay" in n]
    with pytest.raises(OSError):
        os.getxattr(os.path.join(mnt, "passwd"), "trusted.overlay.rofs.ino")


def test_no_whiteout_can_be_made_by_mknod(public):
    """A 0/0 character device is how a deletion is stored: creating one is refused
    (root needed anyway), so nothing can delete a lower name by "creating" a file."""
    import errno
    mnt = public["mnt"]
    with pytest.raises(OSError) as e:
        os.mknod(os.path.join(mnt, "pub", "fake"), 0o600 | 0o020000, os.makedev(0, 0))
    assert e.value.errno == errno.EPERM
    assert not os.path.lexists(os.path.join(mnt, "pub", "fake"))
    os.mknod(os.path.join(mnt, "pub", "null"), 0o600 | 0o020000, os.makedev(1, 3))
    assert os.stat(os.path.join(mnt, "pub", "null")).st_rdev == os.makedev(1, 3)


def test_modes_follow_the_inode_through_links_and_renames(public):
    """A 0600 root file hard-linked or renamed into a world-writable directory stays
    unreadable and unwritable for others."""
    mnt = public["mnt"]
    secret = os.path.join(mnt, "shadow")  # 0600 root in the lower
    os.link(secret, os.path.join(mnt, "pub", "shadow-link"))
    os.rename(os.path.join(mnt, "d", "file"), os.path.join(mnt, "pub", "moved"))
    os.chmod(os.path.join(mnt, "pub", "moved"), 0o600)
    os.chown(os.path.join(mnt, "pub", "moved"), 0, 0)
    for path in ("shadow-link", "moved"):
        p = os.path.join(mnt, "pub", path)
        assert as_user(1000, "cat", p).returncode != 0
        assert as_user(1000, "sh", "-c", "echo x >> %s" % p).returncode != 0
        # sticky /pub: others may not remove or rename it either
        assert as_user(1000, "rm", "-f", p).returncode != 0
        assert os.path.exists(p)


def test_setuid_is_dropped_when_someone_else_writes(public):
    mnt = public["mnt"]
    prog = os.path.join(mnt, "pub", "prog")
    with open(prog, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(prog, 0o6777)
    assert as_user(1000, "sh", "-c", "echo more >> %s" % prog).returncode == 0
    mode = os.stat(prog).st_mode
    assert not mode & 0o6000, oct(mode)  # setuid and (group-executable) setgid
    # and a non-owner cannot chmod it back
    assert as_user(1000, "chmod", "u+s", prog).returncode != 0


def test_symlinks_in_either_layer_are_never_followed_by_rofs(public):
    """Symlinks to /, and .. chains, in the lower and in the state: operations on the
    link itself (lchown, xattrs, copy-up by metadata change) touch only the link, and
    the real root stays exactly as it was."""
    mnt, state = public["mnt"], public["state"]
    root_before = os.stat("/")
    root_xattrs = os.listxattr("/")
    os.symlink("../../../../../../..", os.path.join(mnt, "pub", "up"))
    for link in (os.path.join(mnt, "rootlink"), os.path.join(mnt, "pub", "up")):
        os.chown(link, 1000, 1000, follow_symlinks=False)
        os.setxattr(link, "trusted.rofs-test", b"1", follow_symlinks=False)
        os.utime(link, (1, 1), follow_symlinks=False)
        assert os.lstat(link).st_uid == 1000
    upper = os.path.join(state, public["mnt"].lstrip("/"))
    assert os.path.islink(os.path.join(upper, "rootlink"))
    assert os.readlink(os.path.join(upper, "rootlink")) == "/"
    after = os.stat("/")
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        root_before.st_mode, root_before.st_uid, root_before.st_gid, root_before.st_mtime_ns)
    assert os.listxattr("/") == root_xattrs


def test_state_dir_owned_by_someone_else_or_writable_is_refused(tmp_path):
    from helpers import ROFS
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    for owner, mode, message in ((1000, 0o700, "belongs to uid 1000"),
                                 (0, 0o777, "is writable by group and others"),
                                 (0, 0o703, "is writable by others")):
        state = tmp_path / ("state-%d-%o" % (owner, mode))
        state.mkdir()
        os.chown(state, owner, owner)
        os.chmod(state, mode)
        result = subprocess.run(ROFS + [str(mnt), "--lower", str(lower), "--state",
                                        str(state)], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert os.listdir(state) == []
