"""Starting and stopping rofs as an admin does: from any directory, unmounting /etc
with fusermount3, the same mount flags whichever way it is mounted, and no leftovers of
killed daemons in the runtime dir."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import RofsProcess, is_rofs_mounted, kill_daemons, unmount

pytestmark = pytest.mark.fuse

# The console script setup.sh installs (the venv's bin/rofs), as an admin runs it.
ROFS_COMMAND = os.path.join(os.path.dirname(sys.executable), "rofs")


def test_a_directory_named_rofs_in_the_current_directory_changes_nothing(tmp_path):
    """From ~ after `git clone ... rofs`, or from /etc once /etc/rofs/ holds policies:
    the daemon re-executes itself and must import itself, not ./rofs."""
    (tmp_path / "rofs").mkdir()
    (tmp_path / "rofs" / "__init__.py").write_text("raise ImportError('not this rofs')\n")
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    (lower / "hosts").write_text("lower\n")
    mnt.mkdir()
    try:
        result = subprocess.run([ROFS_COMMAND, str(mnt), "--lower", str(lower), "--state",
                                 str(tmp_path / "state")], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert (mnt / "hosts").read_text() == "lower\n"
    finally:
        unmount(str(mnt))
        kill_daemons(str(tmp_path / "state"))


def in_namespace(script, timeout=120):
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec", script],
                          capture_output=True, text=True, timeout=timeout)


def test_fusermount3_unmounts_etc_and_records_no_lock(tmp_path):
    """fusermount3 takes /etc/mtab.fuselock when /etc/mtab is not a symlink (a minimal
    Debian): through rofs that file held the mount busy and landed in the state.  rofs
    refuses it, as a read-only /etc does, and fusermount3 goes on without it."""
    etc, state = tmp_path / "etc", tmp_path / "state"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    if os.path.lexists(etc / "mtab"):
        os.unlink(etc / "mtab")
    try:
        result = in_namespace(f"""
mount --bind {etc} /etc
mount -o remount,bind,ro /etc
{ROFS_COMMAND} /etc --state {state}
fusermount3 -u /etc
! grep -q ' /etc .* - fuse.rofs ' /proc/self/mountinfo
""")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "unable to open fuse lock file: Read-only file system" in result.stderr
        assert os.listdir(state / "etc") == []
    finally:
        kill_daemons(str(state))


def test_mount_t_fuse_rofs_is_nosuid_nodev_like_rofs(tmp_path):
    lower, mnt, state = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    lower.mkdir()
    mnt.mkdir()
    try:
        result = in_namespace(f"""
mount -t fuse.rofs rofs {mnt} -o state={state},lowerdir={lower}
grep ' {mnt} ' /proc/self/mountinfo
umount {mnt}
{ROFS_COMMAND} {mnt} --lower {lower} --state {state}
grep ' {mnt} ' /proc/self/mountinfo
umount {mnt}
""")
        assert result.returncode == 0, result.stdout + result.stderr
        helper, direct = result.stdout.splitlines()
        for line in (helper, direct):
            assert "nosuid" in line.split()[5] and "nodev" in line.split()[5], line
    finally:
        kill_daemons(str(state))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_a_killed_daemons_records_go_at_the_next_mount(tmp_path):
    run_dir = os.environ["ROFS_RUN_DIR"]  # conftest: the tests' own, not /run/rofs
    lower, state = tmp_path / "lower", tmp_path / "state"
    lower.mkdir()
    state.mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    killed = RofsProcess(str(tmp_path / "a"), str(state / "a"), str(lower)).start()
    mine = set(os.listdir(run_dir))
    assert {n.rsplit(".", 1)[1] for n in mine} >= {"json", "sock"}
    records = [n for n in mine if n.endswith(".json")]
    owned = {n for n in records if read_json(os.path.join(run_dir, n))["pid"] ==
             killed.server()}
    assert len(owned) == 1
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    (stale,) = owned
    assert os.path.exists(os.path.join(run_dir, stale))
    try:
        with RofsProcess(str(tmp_path / "b"), str(state / "b"), str(lower)):
            deadline = time.monotonic() + 10
            while os.path.exists(os.path.join(run_dir, stale)) and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(os.path.join(run_dir, stale))
            assert not os.path.exists(os.path.join(run_dir, stale[:-5] + ".sock"))
    finally:
        unmount(str(tmp_path / "a"))
        killed.stop()
    assert not is_rofs_mounted(str(tmp_path / "a"))


def test_the_daemon_is_rofs_in_ps_and_pgrep_and_so_are_its_threads(tmp_path):
    """The daemon showed as `python` (comm) with `python -c import sys; sys.path[0] =
    ...` for a command line, and every thread as `python` too: an operator looking for
    it by name found nothing.  Now it is `rofs` (pgrep, ps, top, the journal's _COMM),
    its command line is how it was started, and each thread has its own name."""
    lower, mnt, state = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    lower.mkdir()
    mnt.mkdir()
    try:
        result = subprocess.run([ROFS_COMMAND, str(mnt), "--lower", str(lower), "--state",
                                 str(state)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        (status,) = json.loads(subprocess.run(
            [ROFS_COMMAND, "status", "--json", str(mnt)], capture_output=True, text=True,
            timeout=60).stdout)
        pid = status["pid"]
        with open("/proc/%d/comm" % pid) as f:
            assert f.read() == "rofs\n"
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            words = f.read().decode().split("\0")
        assert words[1:5] == [ROFS_COMMAND, str(mnt), "--lower", str(lower)], words
        assert "-c" not in words
        pgrep = subprocess.run(["pgrep", "-x", "rofs"], capture_output=True, text=True)
        assert str(pid) in pgrep.stdout.split()
        with open(mnt / "big", "wb") as f:  # a write and an fsync: the workers start
            f.write(b"x" * (2 << 20))
            os.fsync(f.fileno())
        names = set()
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/comm" % (pid, task)) as f:
                names.add(f.read().strip())
        assert {"rofs", "rofs-writelog", "rofs-control", "rofs-bases"} <= names, names
        assert any(n.startswith("rofs-sync-") for n in names), names
    finally:
        unmount(str(mnt))
        kill_daemons(str(state))
