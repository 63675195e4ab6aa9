"""mount(8) and fstab: `mount -t fuse.rofs` through the standard mount.fuse3 helper,
with rofs's options in the fstab style, in a private mount namespace."""

import subprocess

import pytest
from helpers import kill_daemons

pytestmark = pytest.mark.fuse


def in_namespace(script):
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec", script],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def layers(tmp_path):
    lower, mnt, state = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    lower.mkdir()
    (lower / "hostname").write_text("lower\n")
    mnt.mkdir()
    yield lower, mnt, state
    kill_daemons(str(state))  # only if a step failed inside the namespace


def test_mount_t_fuse_rofs(layers):
    lower, mnt, state = layers
    result = in_namespace(f"""
mount -t fuse.rofs rofs {mnt} -o state={state},lowerdir={lower},noatime
grep -q ' {mnt} .* - fuse.rofs ' /proc/self/mountinfo
cat {mnt}/hostname
echo changed > {mnt}/hostname
umount {mnt}
! grep -q ' {mnt} ' /proc/self/mountinfo
""")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "lower\n"
    assert (state / str(mnt).lstrip("/") / "hostname").read_text() == "changed\n"
    assert (lower / "hostname").read_text() == "lower\n"


def test_fstab_line(layers, tmp_path):
    """The fstab line of docs (mount -T reads another fstab): mount(8)'s own options
    (nofail, x-systemd.*) are left out of what rofs passes to FUSE."""
    lower, mnt, state = layers
    fstab = tmp_path / "fstab"
    fstab.write_text("rofs %s fuse.rofs state=%s,lowerdir=%s,nofail,"
                     "x-systemd.requires-mounts-for=/var/lib,default=persistent 0 0\n"
                     % (mnt, state, lower))
    result = in_namespace(f"""
mount -T {fstab} {mnt}
cat {mnt}/hostname
umount {mnt}
""")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "lower\n"


def test_overlay_style_options(layers, tmp_path):
    """lowerdir=, upperdir=, workdir= as for the kernel's overlay: the upper layer is
    upperdir itself, and the kernel can mount the same directories afterwards."""
    lower, mnt, _ = layers
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir(mode=0o700)
    result = in_namespace(f"""
mount -t fuse.rofs rofs {mnt} -o lowerdir={lower},upperdir={upper},workdir={work}
echo changed > {mnt}/hostname
umount {mnt}
mount -t overlay overlay {mnt} -o lowerdir={lower},upperdir={upper},workdir={work}
cat {mnt}/hostname
umount {mnt}
""")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "changed\n"
    assert (upper / "hostname").read_text() == "changed\n"
    diff = subprocess.run(["rofs", "diff", str(work)], capture_output=True, text=True)
    assert diff.stdout == "M %s/hostname  (content, mtime)\n" % mnt, diff.stderr


def test_upperdir_without_workdir_is_refused(layers, tmp_path):
    lower, mnt, _ = layers
    result = in_namespace(f"""
mount -t fuse.rofs rofs {mnt} -o lowerdir={lower},upperdir={tmp_path}
""")
    assert result.returncode != 0
    assert "upperdir= and -o workdir= go together" in result.stderr


def test_kernel_overlay_options(layers, tmp_path):
    """A command line written for the kernel's overlay works with -t fuse.rofs: index,
    xino, metacopy... change nothing; redirect_dir=off (or follow, nofollow) makes
    renaming a directory with lower content EXDEV, as on the kernel, and mv copies."""
    lower, mnt, _ = layers
    (lower / "dir").mkdir()
    (lower / "dir" / "f").write_text("f\n")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir(mode=0o700)
    options = "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, upper, work)
    rename = "python3 -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])'"
    result = in_namespace(f"""
mount -t fuse.rofs rofs {mnt} -o {options},redirect_dir=on,index=on,xino=auto,metacopy=off
{rename} {mnt}/dir {mnt}/moved
umount {mnt}
mount -t fuse.rofs rofs {mnt} -o {options},redirect_dir=off,index=off
if {rename} {mnt}/moved {mnt}/again 2>/dev/null; then exit 3; fi
mv {mnt}/moved {mnt}/again
cat {mnt}/again/f
umount {mnt}
mount -t overlay overlay {mnt} -o {options},redirect_dir=on
cat {mnt}/again/f
ls {mnt}
umount {mnt}
""")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "f\nf\nagain\nhostname\n"
    bad = subprocess.run(["rofs", str(mnt), "--state", str(tmp_path / "s"), "-o",
                          "userxattr,redirect_dir=on"], capture_output=True, text=True)
    assert bad.returncode == 2 and "conflict" in bad.stderr
