"""Load: many processes at once, user management under it, a flat daemon, and no stall
behind a big copy-up.

ROFS_LOAD_SECONDS sets how long the mixed workload runs (CI: 20 s; the soak in
docs/reliability.md ran minutes).
"""

import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import RofsProcess, wait_for_pause

pytestmark = pytest.mark.fuse

SECONDS = float(os.environ.get("ROFS_LOAD_SECONDS", "20"))
WORKERS = 8
FSSTRESS = os.path.join(os.path.dirname(__file__), "fsstress.py")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def parallel(commands):
    """Run the commands at once; one that lost a lock race ("try again later") is run
    again.  useradd/userdel --prefix take no global lock (lckpwdf is not used with a
    prefix) and give up at once when another holds a file's lock, natively too."""
    pending = list(commands)
    for _ in range(50):
        procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)) for cmd in pending]
        pending = []
        for cmd, p in procs:
            _, err = p.communicate(timeout=300)
            if p.returncode and "try again later" in err:
                pending.append(cmd)
            else:
                assert p.returncode == 0, (cmd, err)
        if not pending:
            return
    raise AssertionError("lock races never settled: %r" % pending)


def test_mixed_load_with_user_management(tmp_path):
    lower = tmp_path / "lower"
    subprocess.run(["cp", "-a", "/etc", str(lower)], check=True)
    (lower / "lowerdir" / "sub").mkdir(parents=True)
    root = tmp_path / "root"
    etc = root / "etc"
    etc.mkdir(parents=True)
    baseline = [sh("pwck", "-r", str(lower / "passwd"), str(lower / "shadow")),
                sh("grpck", "-r", str(lower / "group"), str(lower / "gshadow"))]
    users = ["rofsload%02d" % i for i in range(20)]
    with RofsProcess(str(etc), str(tmp_path / "state"), str(lower)) as daemon:
        pid = daemon.server()
        samples = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                samples.append(rss_kib(pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        workers = [subprocess.Popen([sys.executable, FSSTRESS, str(etc), str(seed),
                                     str(SECONDS)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
                   for seed in range(WORKERS)]
        rounds = 0
        try:
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline or rounds < 2:
                parallel([["useradd", "--prefix", str(root), "-M", u] for u in users])
                got = sh("getent", "-s", "files", "passwd")  # the host's, untouched
                assert "rofsload" not in got.stdout
                passwd = (etc / "passwd").read_text()
                assert all(("\n%s:" % u) in passwd for u in users)
                parallel([["userdel", "--prefix", str(root), u] for u in users])
                rounds += 1
            results = [w.communicate(timeout=SECONDS + 120) for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            done.set()
            sampler.join()
        for worker, (_, err) in zip(workers, results, strict=True):
            assert worker.returncode == 0, err
        assert sum(int(out) for out, _ in results) > 100 * WORKERS
        assert daemon.proc.poll() is None, "the daemon died"
        after = [sh("pwck", "-r", str(etc / "passwd"), str(etc / "shadow")),
                 sh("grpck", "-r", str(etc / "group"), str(etc / "gshadow"))]
        for b, a in zip(baseline, after, strict=True):
            assert (a.returncode, a.stdout.replace(str(etc), str(lower))) == (
                b.returncode, b.stdout), (a, b)
        assert "rofsload" not in (etc / "passwd").read_text()
    assert not daemon.internal_errors(), daemon.output()
    # RSS flat: the last third of the run is no higher than the first third, give or
    # take allocator noise (the workload's name space is bounded).
    third = max(1, len(samples) // 3)
    first, last = max(samples[:third]), max(samples[-third:])
    print("load: %.0f s, %d useradd/userdel rounds of %d users, %d fsstress operations, "
          "daemon RSS %d KiB in the first third, %d KiB in the last"
          % (SECONDS, rounds, len(users), sum(int(out) for out, _ in results), first, last))
    assert last <= first * 1.25 + 8192, samples


def test_stat_answers_while_a_big_copy_up_runs(tmp_path):
    """The data of a big copy-up is copied in a worker thread: other requests are
    answered meanwhile, not after it.  The copy is held in flight (ROFS_PAUSE_AT, see
    rofs/crash.py) while the lookups run, so the test does not depend on timing."""
    lower = tmp_path / "lower"
    lower.mkdir()
    with open(lower / "big", "wb") as f:
        f.write(os.urandom(8 << 20))  # over 1 MiB: copied in a worker thread
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    paused = tmp_path / "paused"
    env = {"ROFS_PAUSE_AT": "copy-up:data", "ROFS_PAUSE_FILE": str(paused)}
    with RofsProcess(str(mnt), str(tmp_path / "state"), str(lower), env=env):
        os.stat(mnt / "big")

        def copy_up():
            with open(mnt / "big", "ab") as f:  # the open copies the whole file up
                f.write(b"+")

        copier = threading.Thread(target=copy_up)
        copier.start()
        try:
            wait_for_pause(paused)
            answered = []

            def look():
                for n in range(200):
                    # A new name each time: a LOOKUP the daemon must answer.
                    answered.append(not os.path.exists(mnt / ("nothing-%d" % n)))
                os.stat(mnt)

            looker = threading.Thread(target=look, daemon=True)
            looker.start()
            looker.join(timeout=60)
            assert len(answered) == 200 and all(answered), (
                "%d lookups answered while the copy-up was in flight" % len(answered))
            assert copier.is_alive(), "the copy-up did not wait"
        finally:
            paused.unlink(missing_ok=True)
            copier.join(timeout=60)
        assert os.path.getsize(mnt / "big") == (8 << 20) + 1


def test_durable_changes_are_not_queued_behind_bulk_copies(tmp_path):
    """The fsyncs that make a change durable before its reply waited in the same queue
    as big copy-ups: one user's copies filled every worker, and root's passwd cycle
    (create, write, rename) waited for them all.  Held in flight at a pause point,
    more big copy-ups than there are workers must leave root's cycle answered."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for i in range(24):
        (lower / ("big%d" % i)).write_bytes(b"x" * (2 << 20))
    (lower / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    paused = tmp_path / "paused"
    env = {"ROFS_PAUSE_AT": "copy-up:data", "ROFS_PAUSE_FILE": str(paused)}
    with RofsProcess(str(mnt), str(tmp_path / "state"), str(lower), env=env):
        def copy_up(i):
            with open(mnt / ("big%d" % i), "ab") as f:  # the open copies it up
                f.write(b"+")

        copiers = [threading.Thread(target=copy_up, args=(i,)) for i in range(24)]
        for copier in copiers:
            copier.start()
        try:
            wait_for_pause(paused)
            time.sleep(1)  # the others reach the pause too (or wait for a worker)
            done = []

            def passwd_cycle():
                (mnt / "nshadow").write_text("root:$6$new:19001:0:99999:7:::\n")
                os.rename(mnt / "nshadow", mnt / "shadow")
                done.append((mnt / "shadow").read_text())

            cycle = threading.Thread(target=passwd_cycle, daemon=True)
            cycle.start()
            cycle.join(timeout=60)
            assert done == ["root:$6$new:19001:0:99999:7:::\n"], \
                "root's passwd cycle waited for the paused copy-ups"
            assert any(c.is_alive() for c in copiers), "the copy-ups did not wait"
        finally:
            # Each copy-up that reaches the pause makes the file again: unpause them all.
            deadline = time.monotonic() + 120
            while any(c.is_alive() for c in copiers) and time.monotonic() < deadline:
                paused.unlink(missing_ok=True)
                time.sleep(0.02)
            paused.unlink(missing_ok=True)
            for copier in copiers:
                copier.join(timeout=10)
