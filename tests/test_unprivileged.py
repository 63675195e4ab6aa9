"""Unprivileged mode: a user other than root mounts rofs over a directory they own
(through fusermount3), with user.overlay.* markers, whiteouts made as the kernel lets
any user make them, and no redirects (as the kernel's `userxattr`).

The user is `nobody`, in a private mount namespace; tests/unprivileged_run.py does the
work as that user and reports what it saw.  This test checks it, then the state on disk,
and mounts the same state with the kernel's overlayfs (`userxattr`) as the oracle.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
from helpers import kill_daemons, manifest

import rofs

pytestmark = pytest.mark.fuse

HERE = os.path.dirname(os.path.abspath(__file__))


def as_user(uid: int, gid: int, env: dict[str, str]) -> list[str]:
    """The command prefix that runs a command as uid:gid with only `env` (through a
    process of that user, as the mount will run: setpriv alone can exec what the user
    could not)."""
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid, "--clear-groups", "env", "-i",
            *("%s=%s" % item for item in env.items())]


def user_python(uid: int, gid: int, pythonpath: str) -> str:
    """An interpreter the user can run: the venv's, unless it lives where others cannot
    reach it (a pyenv under /root), then the system's python3 (rofs needs nothing but
    the standard library)."""
    for python in (sys.executable, "/usr/bin/python3"):
        probe = as_user(uid, gid, {"PYTHONPATH": pythonpath}) + [
            python, "-c", "import rofs"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return python
    pytest.fail("no Python that uid %d can run rofs with" % uid)


@pytest.fixture
def site():
    user = pwd.getpwnam("nobody")
    base = tempfile.mkdtemp(prefix="rofs-unpriv-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        src = os.path.join(base, "src")
        shutil.copytree(os.path.dirname(rofs.__file__), os.path.join(src, "rofs"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(HERE, "unprivileged_run.py"), base)
        lower = os.path.join(base, "lower")
        files = {"mine": "mine\n", "roots": "roots\n", "gone": "gone\n",
                 "dir/inner": "inner\n", "shadow": "old shadow\n", "tree/sub/file": "deep\n"}
        for rel, text in files.items():
            path = os.path.join(lower, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        os.symlink("mine", os.path.join(lower, "link"))
        os.setxattr(os.path.join(lower, "mine"), "user.note", b"kept")
        for dirpath, dirnames, filenames in os.walk(lower):
            for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.chown(name, user.pw_uid, user.pw_gid, follow_symlinks=False)
        os.chown(os.path.join(lower, "roots"), 0, 0)  # root's, but writable by all
        os.chmod(os.path.join(lower, "roots"), 0o666)
        os.chmod(os.path.join(lower, "shadow"), 0o600)
        os.mkdir(os.path.join(base, "roots-dir"))  # a mountpoint the user cannot write
        for name in ("home", "run", "roots-state", "roots-state/.rofs"):
            os.mkdir(os.path.join(base, name), 0o700)
            os.chown(os.path.join(base, name), user.pw_uid, user.pw_gid)
        # A state dir root made (trusted.overlay.* markers), handed to the user.
        with open(os.path.join(base, "roots-state/.rofs/format"), "w") as f:
            f.write("rofs-state 1\n")
        os.mkdir(os.path.join(base, "dev"))
        yield base, user, src
    finally:
        kill_daemons(base)
        subprocess.run(["umount", "-l", os.path.join(base, "lower")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def walk_state(root: str) -> dict:
    """Every entry below root: (type letter, rdev, xattr names)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            names = [] if stat.S_ISLNK(st.st_mode) else sorted(os.listxattr(path))
            kind = "c" if stat.S_ISCHR(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) \
                else "l" if stat.S_ISLNK(st.st_mode) else "f"
            out[os.path.relpath(path, root)] = (kind, st.st_rdev, names)
    return out


def fuse_for_users() -> str:
    """Shell lines for a private namespace: FUSE as users find it on a standard machine.
    /dev/fuse: distributions make it 0666 (the kernel's own checks apply), containers
    sometimes 0600; then the namespace gets a 0666 node of the same device.  /etc/mtab:
    fusermount3 -u reads it to find whose mount it is; systemd makes it a symlink to
    /proc/self/mounts at boot, a minimal root without systemd has none; then the
    namespace's /etc is the machine's with that symlink added (an overlay whose upper
    layer is the test's).  Neither the host's /dev/fuse nor its /etc is touched."""
    lines = ""
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        lines += ("mount -t tmpfs -o mode=755 tmpfs {b}/dev\n"
                  "mknod -m 666 {b}/dev/fuse c 10 229\n"
                  "mount --bind {b}/dev/fuse /dev/fuse\n")
    if not os.path.lexists("/etc/mtab"):
        lines += ("mkdir {b}/etc-upper {b}/etc-work\n"
                  "mount -t overlay overlay -o lowerdir=/etc,upperdir={b}/etc-upper,"
                  "workdir={b}/etc-work /etc\n"
                  "ln -s ../proc/self/mounts /etc/mtab\n")
    return lines


def test_unprivileged_mount(site):
    base, user, src = site
    lower = os.path.join(base, "lower")
    python = user_python(user.pw_uid, user.pw_gid, src)
    before = manifest(lower)
    script = "set -e\n" + fuse_for_users()
    env = {"PATH": os.environ["PATH"], "HOME": base, "XDG_RUNTIME_DIR": base + "/run",
           "PYTHONPATH": src}
    command = as_user(user.pw_uid, user.pw_gid, env) + [
        python, base + "/unprivileged_run.py", base, python]
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         script.format(b=base) + 'exec "$@"', "sh", *command],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    mnt = lower

    assert out["mount"] == [0, ""], out["mount"]
    assert "user_id=%d" % user.pw_uid in out["options"]
    assert "allow_other" not in out["options"]  # the user's mount is the user's alone

    live = out["seen_live"]
    assert live["mine"][:3] == ["file", user.pw_uid, "mine\nchanged\n"]
    # root's file, copied up by a user, becomes the user's (as with cp -p)
    assert live["roots"][:3] == ["file", user.pw_uid, "roots\nchanged\n"]
    assert "gone" not in live and "tree" not in live and "shadow.lock" not in live
    assert live["dir"][0] == "dir" and "dir/inner" not in live
    assert live["shadow"][2] == "new shadow\n"
    assert live["newlink"][:3] == ["link", user.pw_uid, "mine"]
    assert live["moved/sub/file"][2] == "deep\n"
    assert out["rename_lower_dir"] == "EXDEV" and out["mv_lower_dir"] == 0
    assert out["chown_to_root"] == "EPERM"
    assert out["sealed_listing"] == ["inside"] and out["sealed_stat"] == "EACCES"
    assert out["trusted_xattr"] == "EPERM" and out["user_overlay_xattr"] == "ENOTSUP"

    diff = out["diff"].splitlines()
    for line in ("M %s/mine" % mnt, "D %s/gone" % mnt, "A %s/newlink" % mnt,
                 "D %s/tree" % mnt, "A %s/moved" % mnt):
        assert any(d.startswith(line + " ") or d == line for d in diff), out["diff"]
    assert out["revert"] == "reverted %s/newlink\n" % mnt and not out["after_revert"]

    assert out["unmount"] == [0, ""] and "daemon gone" in out["steps"], out["steps"]
    assert out["after_unmount"] == sorted(os.listdir(lower))
    assert "gone" in out["after_unmount"]
    # Kept, with the same inode numbers; but user.* xattrs cannot be set on a symlink,
    # so a copied-up one has no rofs.ino marker and shows a new number after a remount
    # (a documented limit of unprivileged mounts).
    assert out["seen_2"]["link"][:3] == out["seen_1"]["link"][:3] == ["link", user.pw_uid,
                                                                       "mine"]
    assert out["seen_2"]["link"][3] != out["seen_1"]["link"][3]
    assert {k: v for k, v in out["seen_2"].items() if k != "link"} == \
        {k: v for k, v in out["seen_1"].items() if k != "link"}
    assert out["exit_2"] == 0, out["stderr_2"]

    assert out["roots_state"][0] == 2 and "trusted.overlay" in out["roots_state"][1]
    assert out["roots_state"][2] is None
    assert out["not_writable"][0] == 2 and "can write to" in out["not_writable"][1]

    # Unchanged, but for the atime of root's file: O_NOATIME needs ownership.
    after = manifest(lower)
    atime = 6
    assert after["roots"][:atime] + after["roots"][atime + 1:] == \
        before["roots"][:atime] + before["roots"][atime + 1:]
    after["roots"] = before["roots"]
    assert after == before, "the lower layer changed"

    # The state on disk: the kernel's formats, user.overlay.* markers only.
    state = os.path.join(base, "home", "state")
    with open(os.path.join(state, ".rofs", "format")) as f:
        assert f.read() == "rofs-state 1 userxattr\n"
    upper = os.path.join(state, lower.lstrip("/"))
    entries = walk_state(upper)
    assert entries["gone"][:2] == ("c", 0) and entries["tree"][:2] == ("c", 0)
    assert "user.overlay.opaque" in entries["dir"][2]
    assert os.getxattr(os.path.join(upper, "dir"), "user.overlay.opaque") == b"y"
    for path, (_, _, names) in walk_state(state).items():
        assert not any(n.startswith("trusted.") for n in names), path
    assert os.getxattr(os.path.join(upper, "mine"), "user.note") == b"kept"

    # The oracle: the kernel's overlayfs mounts the same state with `userxattr`.
    work = os.path.join(state, ".rofs", "work", lower.lstrip("/"))
    kernel = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-ec",
         "mount -t overlay overlay -o lowerdir={l},upperdir={u},workdir={w},userxattr {m}\n"
         "cd {m} && find . -printf '%y %U %P\\n' && cat mine shadow moved/sub/file"
         .format(l=lower, u=upper, w=work, m=os.path.join(base, "roots-dir"))],
        capture_output=True, text=True, timeout=60)
    assert kernel.returncode == 0, kernel.stderr
    ours = sorted("%s %d %s" % (kind[0], uid, rel)
                  for rel, (kind, uid, _, _) in out["seen_2"].items())
    theirs = sorted(line for line in kernel.stdout.splitlines()
                    if line[:2] in ("f ", "d ", "l ") and not line.endswith(" "))
    assert theirs == ours, (theirs, ours)
    assert kernel.stdout.endswith("mine\nchanged\nnew shadow\ndeep\n")


def test_root_s_status_shows_a_user_s_mount_as_live_and_passes(site):
    """A user's own rofs mount made root's `rofs status` fail (exit 1: no socket of
    root's for it), and root's mount did the same to the user's."""
    base, user, src = site
    lower = os.path.join(base, "lower")
    python = user_python(user.pw_uid, user.pw_gid, src)
    env = {"PATH": os.environ["PATH"], "HOME": base, "XDG_RUNTIME_DIR": base + "/run",
           "PYTHONPATH": src}
    user_rofs = " ".join(as_user(user.pw_uid, user.pw_gid, env) + [python, "-m", "rofs"])
    root_rofs = " ".join([sys.executable, "-m", "rofs"])
    script = fuse_for_users() + (
        "set -e\n"
        # Only this test's mount in this namespace (tests running in parallel have
        # theirs, which `rofs status` would list too).
        "for m in $(awk '$3 == \"fuse.rofs\" {{print $2}}' /proc/self/mounts); do\n"
        "    umount -l \"$m\"\n"
        "done\n"
        "{user} {l} --state {b}/home/state\n"
        "set +e\n"
        "{root} status; echo \"root: exit $?\"\n"
        "{root} status --json; echo\n"
        "{user} status; echo \"user: exit $?\"\n"
        "umount {l}\n")
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         script.format(b=base, l=lower, user=user_rofs, root=root_rofs)],
        capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert "%s: live, mounted by uid %d (`rofs status` as that user says more)" % (
        lower, user.pw_uid) in lines, result.stdout + result.stderr
    assert "root: exit 0" in lines
    start = lines.index("root: exit 0") + 1
    entries = json.loads("\n".join(lines[start:lines.index("", start)]))
    assert entries == [{"mountpoint": lower, "ok": True, "owner": user.pw_uid}]
    # The user's own view says everything.
    assert "user: exit 0" in lines and "%s: live, pid " % lower in result.stdout
