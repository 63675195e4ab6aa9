"""The state dir is kernel-overlayfs format: the kernel shows what rofs showed, and rofs
shows what the kernel wrote."""

import os
import subprocess

import pytest
from helpers import RofsProcess, view

pytestmark = pytest.mark.fuse


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
    assert entries["link"].content == "shadow"
    assert ["ssh/sshd_config", "sshd-hardlink"] in groups
    # A lower hard link copied up under one name while the other was not looked up yet:
    # rofs's index keeps them one inode; the kernel without index=on breaks the link.
    assert (["passwd", "passwd-hardlink"] in groups) == lower_links_kept


def test_kernel_overlay_shows_what_rofs_showed(mounted, kernel_overlay, tmp_path):
    m = mounted
    session(m["mnt"])
    seen_by_rofs = view(m["mnt"], mtimes=True)
    assert_session_visible(seen_by_rofs, lower_links_kept=True)
    assert m["proc"].stop() == 0
    name = m["mnt"].lstrip("/")
    upper = os.path.join(m["state"], name)
    work = os.path.join(m["state"], ".rofs", "work", name)
    target = tmp_path / "kernel"
    target.mkdir()
    kernel_overlay(m["lower"], upper, work, str(target))
    assert view(str(target), mtimes=True) == seen_by_rofs


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
    seen_by_kernel = view(str(target), mtimes=True)
    assert_session_visible(seen_by_kernel, lower_links_kept=False)
    subprocess.run(["umount", str(target)], check=True)
    with RofsProcess(layers["mnt"], layers["state"], layers["lower"]) as proc:
        assert view(layers["mnt"], mtimes=True) == seen_by_kernel
        assert not proc.internal_errors()
