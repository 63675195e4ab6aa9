"""The state dir is kernel-overlayfs format: the kernel shows what rofs showed, and rofs
shows what the kernel wrote."""

import hashlib
import os
import stat
import subprocess

import pytest
from helpers import RofsProcess

pytestmark = pytest.mark.fuse


def snapshot(root):
    """What a user sees: names, type, mode, owner, content, link targets, nlink of
    non-directories, and which names share an inode."""
    entries = {}
    inodes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(path)
            nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            entries[rel] = (st.st_mode, st.st_uid, st.st_gid, data, nlink, mtime)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
    groups = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return entries, groups


def session(root):
    """A bit of everything a package manager or passwd does."""
    with open(os.path.join(root, "d", "file"), "a") as f:
        f.write("appended\n")
    os.chmod(os.path.join(root, "ssh", "sshd_config"), 0o600)
    os.chown(os.path.join(root, "passwd"), 0, 42)
    os.unlink(os.path.join(root, "shadow"))
    with open(os.path.join(root, "nshadow"), "w") as f:
        f.write("root:$6$x:1::::::\n")
    os.rename(os.path.join(root, "nshadow"), os.path.join(root, "shadow"))
    os.unlink(os.path.join(root, "big"))
    os.unlink(os.path.join(root, "d", "sub", "deep", "leaf"))
    os.rmdir(os.path.join(root, "d", "sub", "deep"))
    os.mkdir(os.path.join(root, "d", "sub", "deep"))
    os.rename(os.path.join(root, "d"), os.path.join(root, "d-moved"))
    os.mkdir(os.path.join(root, "ssh", "moved-in"))
    os.rename(os.path.join(root, "empty"), os.path.join(root, "ssh", "moved-in", "e"))
    os.unlink(os.path.join(root, "link"))
    os.symlink("shadow", os.path.join(root, "link"))
    os.link(os.path.join(root, "ssh", "sshd_config"), os.path.join(root, "sshd-hardlink"))
    os.rename(os.path.join(root, "fifo"), os.path.join(root, "fifo2"))
    os.setxattr(os.path.join(root, "passwd-hardlink"), "user.x", b"1")


def assert_session_visible(seen, lower_links_kept):
    entries, groups = seen
    assert "d" not in entries and "empty" not in entries and "big" not in entries
    assert "d-moved/sub/deep" in entries and "d-moved/sub/deep/leaf" not in entries
    assert "d-moved/file" in entries and "ssh/moved-in/e" in entries
    assert entries["link"][3] == "shadow"
    assert ["ssh/sshd_config", "sshd-hardlink"] in groups
    # A lower hard link copied up under one name while the other was not looked up yet:
    # rofs's index keeps them one inode; the kernel without index=on breaks the link.
    assert (["passwd", "passwd-hardlink"] in groups) == lower_links_kept


def test_kernel_overlay_shows_what_rofs_showed(mounted, kernel_overlay, tmp_path):
    m = mounted
    session(m["mnt"])
    seen_by_rofs = snapshot(m["mnt"])
    assert_session_visible(seen_by_rofs, lower_links_kept=True)
    assert m["proc"].stop() == 0
    name = m["mnt"].lstrip("/")
    upper = os.path.join(m["state"], name)
    work = os.path.join(m["state"], ".rofs", "work", name)
    target = tmp_path / "kernel"
    target.mkdir()
    kernel_overlay(m["lower"], upper, work, str(target))
    assert snapshot(str(target)) == seen_by_rofs


def test_rofs_shows_what_the_kernel_wrote(layers, kernel_overlay, tmp_path):
    name = layers["mnt"].lstrip("/")
    upper = os.path.join(layers["state"], name)
    os.makedirs(upper)
    kwork = os.path.join(layers["state"], "kwork")
    os.makedirs(kwork)
    target = tmp_path / "kernel"
    target.mkdir()
    kernel_overlay(layers["lower"], upper, kwork, str(target))
    session(str(target))
    seen_by_kernel = snapshot(str(target))
    assert_session_visible(seen_by_kernel, lower_links_kept=False)
    subprocess.run(["umount", str(target)], check=True)
    with RofsProcess(layers["mnt"], layers["state"], layers["lower"]) as proc:
        assert snapshot(layers["mnt"]) == seen_by_kernel
        assert not proc.internal_errors()
