"""Several processes hammer one mount; the daemon survives, the tree stays consistent.
A handler that raises is answered with EIO and the mount stays up."""

import errno
import os
import shutil
import subprocess
import sys

import pytest
from helpers import RofsProcess

pytestmark = pytest.mark.fuse

SECONDS = float(os.environ.get("ROFS_STRESS_SECONDS", "15"))
WORKERS = int(os.environ.get("ROFS_STRESS_WORKERS", "4"))
SCRIPT = os.path.join(os.path.dirname(__file__), "fsstress.py")


def tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    data = f.read()
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_nlink if not
                                                os.path.isdir(path) else None, st.st_size,
                                                st.st_ino, data)
    return out


def test_random_workload_of_several_processes(layers):
    lowerdir = os.path.join(layers["lower"], "lowerdir", "sub")
    os.makedirs(lowerdir)
    for i in range(6):
        with open(os.path.join(lowerdir, "f%d" % i), "wb") as f:
            f.write(os.urandom(5000))
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"]).start()
    try:
        workers = [subprocess.Popen([sys.executable, SCRIPT, layers["mnt"], str(seed),
                                     str(SECONDS)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
                   for seed in range(WORKERS)]
        results = [w.communicate(timeout=SECONDS + 120) for w in workers]
        for worker, (_, err) in zip(workers, results, strict=True):
            assert worker.returncode == 0, err + "\n" + "\n".join(
                proc.output().splitlines()[-80:])
        assert sum(int(out) for out, _ in results) > 100
        assert proc.proc.poll() is None, "the daemon died"
        before = tree(layers["mnt"])
        proc.stop()
        assert proc.proc.returncode == 0
        assert not proc.internal_errors(), proc.output()
        # Nothing in the state dir that `rofs check` would call damage.
        check = subprocess.run([sys.executable, "-m", "rofs", "check", layers["state"]],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"]).start()
        after = tree(layers["mnt"])
        diff = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                if before.get(k) != after.get(k)}
        assert not diff, diff
        for name in os.listdir(layers["mnt"]):
            path = os.path.join(layers["mnt"], name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        assert os.listdir(layers["mnt"]) == []
        work = os.path.join(layers["state"], ".rofs", "work", layers["mnt"].lstrip("/"))
        assert os.listdir(work) == []
    finally:
        proc.stop()
    assert not proc.internal_errors(), proc.output()


def test_handler_exception_is_eio_and_the_mount_stays_up(layers):
    proc = RofsProcess(layers["mnt"], layers["state"], layers["lower"],
                       env={"ROFS_FAULT_NAME": "boom"}).start()
    try:
        for _ in range(3):
            with pytest.raises(OSError) as e:
                os.stat(os.path.join(layers["mnt"], "boom"))
            assert e.value.errno == errno.EIO
        with open(os.path.join(layers["mnt"], "passwd")) as f:
            assert f.read().startswith("root:")
        with open(os.path.join(layers["mnt"], "fine"), "w") as f:
            f.write("still writable")
    finally:
        status = proc.stop()
    assert status == 0
    out = proc.output()
    assert "internal error in lookup" in out and "Traceback" in out
    assert "InjectedFault: injected fault in lookup" in out
    assert "3 requests failed with internal errors" in out
