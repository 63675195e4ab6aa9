"""The mount outlives its server: SIGKILL the serving process and the keeper's next one
takes over (rofs/daemon/keeper.py).  Callers see a pause: no error on any path, open
descriptors keep working, a working directory inside the mount stays valid, and a
change in flight when the server died is made once."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
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
                pytest.fail("the reader stopped: %s" % reader.communicate()[0])
            if load.poll() is not None:
                pytest.fail("the workload stopped: %s" % read_text(
                    os.path.join(tmp, "load.json")))
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
