"""Run by tests/test_unprivileged.py as a user other than root, inside a private mount
namespace: mount rofs over a directory the user owns, make changes of every kind,
unmount, mount again, unmount; print what was seen as one JSON object.

    unprivileged_run.py BASE PYTHON

BASE holds lower/ (the user's directory, also the mountpoint) and home/ (the user's,
where the state dir is made).
Every mount this script makes is unmounted in a `finally`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

BASE, PYTHON = sys.argv[1], sys.argv[2]
MNT = os.path.join(BASE, "lower")
STATE = os.path.join(BASE, "home", "state")
ROFS = [PYTHON, "-m", "rofs"]
out: dict = {"steps": []}


def rofs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(ROFS + list(args), capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise SystemExit("rofs %s: exit %d: %s" % (" ".join(args), result.returncode,
                                                   result.stderr))
    return result


def mounted() -> str | None:
    """The options of the rofs mount at MNT, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == MNT and fields[fields.index("-") + 1] == "fuse.rofs":
                return fields[-1]
    return None


def seen() -> dict:
    """name -> (type, owner uid, content or target, inode number) below MNT."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(MNT):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, MNT)
            if os.path.islink(path):
                entries[rel] = ("link", st.st_uid, os.readlink(path), st.st_ino)
            elif os.path.isdir(path):
                entries[rel] = ("dir", st.st_uid, None, st.st_ino)
            else:
                with open(path) as f:
                    entries[rel] = ("file", st.st_uid, f.read(), st.st_ino)
    return entries


def unmount() -> None:
    if mounted() is not None:
        subprocess.run(["fusermount3", "-u", MNT], capture_output=True)
    if mounted() is not None:
        subprocess.run(["fusermount3", "-u", "-z", MNT], capture_output=True)


def exited(pid: int) -> bool:
    """Gone, or a zombie (exited, not yet reaped by whoever adopted it)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while not exited(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if exited(pid):
        out["steps"].append("daemon gone")
        return
    # What it waits on, per thread, for the failure's message.
    threads = []
    for task in sorted(os.listdir("/proc/%d/task" % pid)):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, task)) as f:
                comm = f.read().strip()
            with open("/proc/%d/task/%s/wchan" % (pid, task)) as f:
                threads.append("%s %s" % (comm, f.read()))
        except OSError:
            pass
    out["steps"].append("daemon still running (threads waiting in: %s)" % ", ".join(threads))


def live_pid() -> int:
    runtime = os.path.join(os.environ["XDG_RUNTIME_DIR"], "rofs")
    (record,) = [n for n in os.listdir(runtime) if n.endswith(".json")]
    with open(os.path.join(runtime, record)) as f:
        return json.load(f)["pid"]


def try_call(fn) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def first_session() -> None:
    result = rofs(MNT, "--state", STATE, check=False)
    out["mount"] = [result.returncode, result.stderr]
    out["options"] = mounted()
    if out["options"] is None:
        return
    pid = live_pid()
    try:
        with open(os.path.join(MNT, "mine"), "a") as f:  # copy-up of the user's file
            f.write("changed\n")
        with open(os.path.join(MNT, "roots"), "a") as f:  # copy-up of root's 0666 file
            f.write("changed\n")
        os.unlink(os.path.join(MNT, "gone"))  # whiteout
        os.unlink(os.path.join(MNT, "dir", "inner"))
        os.rmdir(os.path.join(MNT, "dir"))  # whiteout of a directory
        os.mkdir(os.path.join(MNT, "dir"))  # now opaque
        # passwd's cycle: a lock by link(), a new file renamed over the old one
        with open(os.path.join(MNT, "shadow.new"), "w") as f:
            f.write("new shadow\n")
        os.link(os.path.join(MNT, "shadow.new"), os.path.join(MNT, "shadow.lock"))
        os.rename(os.path.join(MNT, "shadow.new"), os.path.join(MNT, "shadow"))
        os.unlink(os.path.join(MNT, "shadow.lock"))
        os.symlink("mine", os.path.join(MNT, "newlink"))
        os.utime(os.path.join(MNT, "link"), (1, 1), follow_symlinks=False)  # copy-up
        # Without redirects (user.overlay.*), moving a lower directory is EXDEV, as in
        # the kernel with userxattr; mv copies instead.
        out["rename_lower_dir"] = try_call(lambda: os.rename(
            os.path.join(MNT, "tree"), os.path.join(MNT, "moved")))
        out["mv_lower_dir"] = subprocess.run(
            ["mv", os.path.join(MNT, "tree"), os.path.join(MNT, "moved")],
            capture_output=True, text=True).returncode
        out["chown_to_root"] = try_call(lambda: os.chown(os.path.join(MNT, "mine"), 0, 0))
        out["trusted_xattr"] = try_call(lambda: os.setxattr(
            os.path.join(MNT, "mine"), "trusted.overlay.opaque", b"y"))
        out["user_overlay_xattr"] = try_call(lambda: os.setxattr(
            os.path.join(MNT, "mine"), "user.overlay.opaque", b"y"))
        # A directory its owner made r-- (no search): listed by name, as on any
        # filesystem, though nothing in it can be stat'ed.
        sealed = os.path.join(MNT, "sealed")
        os.mkdir(sealed)
        open(os.path.join(sealed, "inside"), "w").close()
        os.chmod(sealed, 0o444)
        out["sealed_listing"] = sorted(os.listdir(sealed))
        out["sealed_stat"] = try_call(lambda: os.stat(os.path.join(sealed, "inside")))
        os.chmod(sealed, 0o755)
        out["seen_live"] = seen()
        out["diff"] = rofs("diff", STATE).stdout
        out["revert"] = rofs("revert", os.path.join(MNT, "newlink")).stdout
        out["after_revert"] = os.path.lexists(os.path.join(MNT, "newlink"))
        out["seen_1"] = seen()
    finally:
        result = subprocess.run(["fusermount3", "-u", MNT], capture_output=True, text=True)
        out["unmount"] = [result.returncode, result.stderr]
        unmount()
        wait_gone(pid)
    out["after_unmount"] = sorted(os.listdir(MNT))  # the plain lower (not read: atimes)


def second_session() -> None:
    daemon = subprocess.Popen(ROFS + [MNT, "--state", STATE, "-f"], stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 20
        while mounted() is None and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        out["seen_2"] = seen()
    finally:
        unmount()
        try:
            out["exit_2"] = daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            out["exit_2"] = daemon.wait()
        out["stderr_2"] = daemon.stderr.read()


def refused() -> None:
    """What a user cannot do: a root-made state dir, a mountpoint of someone else's."""
    result = rofs(MNT, "--state", os.path.join(BASE, "roots-state"), check=False)
    out["roots_state"] = [result.returncode, result.stderr, mounted()]
    unmount()
    result = rofs(os.path.join(BASE, "roots-dir"), "--state", os.path.join(BASE, "home", "other"),
                  check=False)
    out["not_writable"] = [result.returncode, result.stderr]


first_session()
second_session()
refused()
print(json.dumps(out))
