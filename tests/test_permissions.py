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
