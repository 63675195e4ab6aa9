"""The mount outlives its server: SIGKILL the serving process and the keeper's next one
takes over (rofs/daemon/keeper.py).  Callers see a pause: no error on any path, open
descriptors keep working, a working directory inside the mount stays valid, and a
change in flight when the server died is made once."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import (
    RofsProcess,
    is_rofs_mounted,
    manifest,
    read_text,
    run_rofs,
    unmount,
    write_text,
)

pytestmark = pytest.mark.fuse

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = int(os.environ.get("ROFS_TAKEOVER_KILLS", "20"))

READER = """
import os, sys, time
os.setgid(65534); os.setuid(65534)
mnt, stop = sys.argv[1:]
done, error = 0, None
try:
    while not os.path.exists(stop):
        with open(os.path.join(mnt, "passwd"), "rb") as f:
            assert f.read().startswith(b"root:")
        assert "passwd" in os.listdir(mnt)
        done += 1
except BaseException as e:
    error = "%s: %s" % (type(e).__name__, e)
print(repr((done, error)))
"""


def gone(pid: int) -> bool:
    """Whether process `pid` exited (a zombie nobody reaped counts)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def layers():
    # Under a directory every uid can traverse: the reader runs as uid 65534.
    base = tempfile.mkdtemp(prefix="rofs-takeover-", dir="/tmp")
    os.chmod(base, 0o755)
    lower, state, mnt = (os.path.join(base, n) for n in ("lower", "state", "mnt"))
    os.makedirs(os.path.join(lower, "d"))
    os.chmod(lower, 0o755)
    os.makedirs(mnt)
    for name in ("passwd", "shadow", "group", "hosts"):
        write_text(os.path.join(lower, name), "root:x:0:0 %s\n" % name)
    with open(os.path.join(lower, "big"), "wb") as f:
        f.write(os.urandom(3 << 20))
    before = manifest(lower)
    try:
        yield {"lower": lower, "state": state, "mnt": mnt, "tmp": base}
        assert manifest(lower) == before, "the lower layer changed"
    finally:
        if not is_rofs_mounted(mnt):
            shutil.rmtree(base)


@pytest.mark.parametrize("args", [(), ("--no-open",)], ids=["default", "no-open"])
def test_killed_servers_are_replaced_and_callers_see_a_pause(layers, args):
    """KILLS times, at random moments, while a workload runs: every call succeeds."""
    tmp, mnt = layers["tmp"], layers["mnt"]
    stop = os.path.join(tmp, "stop")
    daemon = RofsProcess(mnt, layers["state"], layers["lower"], args)
    load = reader = None
    try:
        daemon.start()
        load = subprocess.Popen([sys.executable, os.path.join(HERE, "takeover_load.py"),
                                 mnt, stop, os.path.join(tmp, "load.json")])
        reader = subprocess.Popen([sys.executable, "-c", READER, mnt, stop],
                                  stdout=subprocess.PIPE, text=True)
        # Locks held through the mount are the kernel's (rofs implements none): they
        # stay held across every takeover.
        locked = open(os.path.join(mnt, "group"), "rb")
        fcntl.flock(locked, fcntl.LOCK_EX)
        rng = random.Random(os.environ.get("ROFS_TAKEOVER_SEED", "takeover"))
        pauses = []
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.02, 0.3))
            start = time.monotonic()
            daemon.kill_server()
            os.stat(os.path.join(mnt, "passwd"))  # answered by the successor
            pauses.append(time.monotonic() - start)
            if reader.poll() is not None:
                pytest.fail("the reader stopped: %s\n%s" % (reader.communicate()[0],
                                                             daemon.output()[-4000:]))
            if load.poll() is not None:
                pytest.fail("the workload stopped: %s\n%s" % (read_text(
                    os.path.join(tmp, "load.json")), daemon.output()[-3000:]))
        write_text(stop, "")
        assert load.wait(timeout=60) == 0
        out, _ = reader.communicate(timeout=60)
        with open(os.path.join(tmp, "load.json")) as f:
            result = json.load(f)
        assert result["error"] is None, result
        assert result["done"] > KILLS // 2, result
        done, error = eval(out)
        assert error is None and done > 0, (done, error)
        assert is_rofs_mounted(mnt)
        other = subprocess.run([sys.executable, "-c", "import fcntl, sys; fcntl.flock("
                                "open(sys.argv[1], 'rb'), fcntl.LOCK_EX | fcntl.LOCK_NB)",
                                os.path.join(mnt, "group")], capture_output=True, text=True)
        assert "BlockingIOError" in other.stderr, other.stderr
        locked.close()
        status = json.loads(run_rofs("status", "--json", mnt).stdout)[0]
        assert status["replaced"] == KILLS and status["pid"] == daemon.server()
        assert status["internal_errors"] == 0, daemon.output()
        print("longest call %.3f s, longest kill-to-answer %.3f s over %d kills, %d turns"
              % (result["longest"], max(pauses), KILLS, result["done"]))
    finally:
        write_text(stop, "")
        for proc in (load, reader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.output()
    # What the workload saw is what the state holds.
    with RofsProcess(mnt, layers["state"], layers["lower"]):
        with open(os.path.join(mnt, "big"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == result["big"]
        assert sorted(os.listdir(mnt)) == ["big", "d", "group", "hosts", "passwd", "shadow"]
    run_rofs("check", layers["state"])


def test_restart_hands_the_mount_to_the_code_installed_now(layers):
    """`rofs restart`: the daemon started from a copy of rofs is replaced by one running
    that copy as changed since (an upgrade), three times, while the workload runs; then
    the new daemon survives a kill as the first did, and unmounts as usual."""
    tmp, mnt = layers["tmp"], layers["mnt"]
    stop = os.path.join(tmp, "stop")
    copy = os.path.join(tmp, "installed")
    shutil.copytree(os.path.join(HERE, "..", "rofs"), os.path.join(copy, "rofs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    bootstrap = ("import sys; sys.path[0] = %r; from rofs.cli import entry; "
                 "sys.exit(entry())" % copy)
    rofs = [sys.executable, "-c", bootstrap]
    version = os.path.join(copy, "rofs", "__init__.py")
    logged = os.path.join(tmp, "daemon.log")
    with open(logged, "wb") as out:  # every keeper's and server's log, in turn
        first = subprocess.Popen(rofs + [mnt, "--state", layers["state"], "--lower",
                                         layers["lower"], "-f"], stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while not is_rofs_mounted(mnt):
        assert time.monotonic() < deadline, read_text(logged)
        time.sleep(0.02)
    load = None
    try:
        load = subprocess.Popen([sys.executable, os.path.join(HERE, "takeover_load.py"),
                                 mnt, stop, os.path.join(tmp, "load.json")])
        time.sleep(0.3)
        for n in range(1, 4):
            before = json.loads(run_rofs("status", "--json", mnt).stdout)[0]
            with open(version, "w") as f:
                f.write('__version__ = "0.%d-upgraded"\n' % n)
            done = subprocess.run(rofs + ["restart", mnt], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr + read_text(logged)
            after = json.loads(run_rofs("status", "--json", mnt, code=None).stdout)[0]
            assert after["internal_errors"] == 0, read_text(logged)
            assert after["version"] == "0.%d-upgraded" % n
            assert after["keeper"] != before["keeper"] and after["pid"] != before["pid"]
            assert after["replaced"] == n and after["last_replaced"] == "restart"
            assert gone(before["keeper"]), "the old keeper is still there"
            if load.poll() is not None:
                pytest.fail("the workload stopped: %s\n%s" % (read_text(
                    os.path.join(tmp, "load.json")), read_text(logged)[-3000:]))
            time.sleep(0.2)
        keeper = after["keeper"]
        with open("/proc/%d/task/%d/children" % (keeper, keeper)) as f:
            os.kill(int(f.read().split()[0]), signal.SIGKILL)
        time.sleep(0.3)
        write_text(stop, "")
        assert load.wait(timeout=60) == 0
        with open(os.path.join(tmp, "load.json")) as f:
            result = json.load(f)
        assert result["error"] is None, result
        status = json.loads(run_rofs("status", "--json", mnt).stdout)[0]
        assert status["replaced"] == 4 and status["last_replaced"] == "killed by SIGKILL"
    finally:
        write_text(stop, "")
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        unmount(mnt)  # lazily if a failed check left a file open
        assert first.wait(timeout=30) == 0  # it handed over, and left
    deadline = time.monotonic() + 20
    while not gone(keeper) and time.monotonic() < deadline:
        time.sleep(0.05)  # the keeper exits once its server unmounted
    assert gone(keeper) and not is_rofs_mounted(mnt)
    run_rofs("check", layers["state"])


def test_a_restart_into_code_that_cannot_start_leaves_the_old_daemon_serving(layers):
    mnt = layers["mnt"]
    copy = os.path.join(layers["tmp"], "installed")
    shutil.copytree(os.path.join(HERE, "..", "rofs"), os.path.join(copy, "rofs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    rofs = [sys.executable, "-c", "import sys; sys.path[0] = %r; from rofs.cli import "
            "entry; sys.exit(entry())" % copy]
    subprocess.run(rofs + [mnt, "--state", layers["state"], "--lower", layers["lower"]],
                   check=True, timeout=60)
    try:
        before = json.loads(run_rofs("status", "--json", mnt).stdout)[0]
        held = open(os.path.join(mnt, "passwd"), "rb")
        # A broken upgrade: the new code dies importing the handover.
        with open(os.path.join(copy, "rofs", "daemon", "handover.py"), "a") as f:
            f.write("\nraise SystemExit('a broken upgrade')\n")
        done = subprocess.run(rofs[:2] + [rofs[2].replace(copy, os.path.join(HERE, ".."))]
                              + ["restart", mnt], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and "the old one serves on" in done.stderr, done
        after = json.loads(run_rofs("status", "--json", mnt).stdout)[0]
        # (It failed before the server handed over: the same server serves on.)
        assert after["keeper"] == before["keeper"] and after["pid"] == before["pid"]
        assert after["restarts_failed"] == 1 and after["replaced"] == 0
        assert held.read().startswith(b"root:")  # a handle from before still works
        held.close()
        write_text(os.path.join(mnt, "after"), "written\n")
    finally:
        unmount(mnt)  # lazily if a failed check left a file open
    assert not is_rofs_mounted(mnt)


def test_files_held_open_on_a_background_daemon_survive_a_takeover(layers):
    """Started in the background, the keeper closed the pipe that told the command the
    mount was ready, and the server may give that number to a file: a successor must
    still find that file (it took the number for the keeper's own, and answered EBADF)."""
    mnt = layers["mnt"]
    run_rofs(mnt, "--state", layers["state"], "--lower", layers["lower"])
    try:
        held = [open(os.path.join(mnt, "passwd"), "rb") for _ in range(8)] + \
            [open(os.path.join(mnt, "hosts"), "ab") for _ in range(8)]
        for _ in range(2):
            (status,) = json.loads(run_rofs("status", "--json", mnt).stdout)
            os.kill(status["pid"], signal.SIGKILL)
            for f in held:
                if f.mode == "rb":
                    f.seek(0)
                    assert f.read().startswith(b"root:")
                else:
                    f.write(b"x")
                    f.flush()
        for f in held:
            f.close()
        (status,) = json.loads(run_rofs("status", "--json", mnt).stdout)
        assert status["replaced"] == 2 and status["internal_errors"] == 0
        assert read_text(os.path.join(mnt, "hosts")).endswith("x" * 16)
    finally:
        unmount(mnt)  # lazily if a failed check left a file open


def test_a_rename_made_by_a_dead_server_moves_the_names_the_kernel_holds(layers):
    """With --no-open a file is read by its node id: the server died after renaming it
    on disk and before telling its journal, the kernel sent the rename again, and the
    next server, which answered it done, must find that node id under the new name."""
    mnt = layers["mnt"]
    daemon = RofsProcess(mnt, layers["state"], layers["lower"], ("--no-open",),
                         env={"ROFS_CRASH_AT": "rename:done", "ROFS_CRASH_ONLY": "server"})
    with daemon:
        # passwd's cycle: the new file, a lock linked to it, the rename, the lock gone
        # (which met the file again by its other name before the kernel named it).
        write_text(os.path.join(mnt, "new"), "new passwd\n")
        os.link(os.path.join(mnt, "new"), os.path.join(mnt, "lock"))
        with open(os.path.join(mnt, "new"), "rb") as held:
            first = daemon.server()
            os.rename(os.path.join(mnt, "new"), os.path.join(mnt, "passwd"))
            assert daemon.server() != first, "the server did not die renaming"
            os.unlink(os.path.join(mnt, "lock"))
            # Not from the page cache: a READ by node id.
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert held.read() == b"new passwd\n"
        assert read_text(os.path.join(mnt, "passwd")) == "new passwd\n"


def test_a_request_that_kills_every_server_is_answered_eio_and_the_rest_served(layers):
    """The death-spiral guard: a lookup every server dies on (ROFS_POISON_NAME) is
    answered EIO after POISON_DEATHS deaths in a row; the mount serves the rest."""
    from rofs.daemon.keeper import POISON_DEATHS
    mnt = layers["mnt"]
    daemon = RofsProcess(mnt, layers["state"], layers["lower"],
                         env={"ROFS_POISON_NAME": "poison"})
    with daemon:
        with pytest.raises(OSError) as raised:
            os.stat(os.path.join(mnt, "poison"))
        assert raised.value.errno == errno.EIO
        assert read_text(os.path.join(mnt, "passwd")).startswith("root:")
        (status,) = json.loads(run_rofs("status", "--json", mnt).stdout)
        assert status["replaced"] == POISON_DEATHS
        assert "servers died serving it" in daemon.output()
