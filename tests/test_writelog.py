"""The write log (who writes where) and `rofs report`, through real mounts."""

import json
import os
import shutil
import subprocess

import pytest
from helpers import ROFS, RofsProcess

from rofs import state
from rofs.report import load_events
from rofs.writelog import ProcessCache, WriteLog

pytestmark = pytest.mark.fuse


def rofs(*args, check=True):
    result = subprocess.run(ROFS + list(args), capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def events_of(state_dir):
    events, files, bad = load_events([str(state_dir)])
    assert files and not bad
    return events


# ------------------------------------------------------------ the log itself


def test_every_kind_of_change_is_logged_with_its_caller(tmp_path):
    lower, mnt, st = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    (lower / "dir").mkdir(parents=True)
    (lower / "file").write_text("lower\n")
    mnt.mkdir()
    with RofsProcess(str(mnt), str(st), str(lower)):
        script = """
import os, sys
m = sys.argv[1]
with open(m + "/file", "a") as f:
    f.write("more\\n")
os.chmod(m + "/file", 0o600)
os.chown(m + "/file", 12, 34)
os.utime(m + "/file", (1, 2))
os.truncate(m + "/file", 3)
os.setxattr(m + "/file", "user.k", b"v")
os.removexattr(m + "/file", "user.k")
os.mkdir(m + "/new")
os.symlink("file", m + "/sym")
os.mkfifo(m + "/fifo")
os.link(m + "/file", m + "/hard")
os.rename(m + "/hard", m + "/new/hard")
os.unlink(m + "/new/hard")
os.rmdir(m + "/dir")
"""
        proc = subprocess.run(["python3", "-c", script, str(mnt), "marker-arg"], check=True)
        assert proc.returncode == 0
    events = events_of(st)
    m = str(mnt)
    seen = [(e["op"], e["path"], e.get("path2")) for e in events]
    assert seen == [
        ("write", m + "/file", None), ("chmod", m + "/file", None),
        ("chown", m + "/file", None), ("utimens", m + "/file", None),
        ("truncate", m + "/file", None), ("setxattr", m + "/file", None),
        ("removexattr", m + "/file", None), ("mkdir", m + "/new", None),
        ("symlink", m + "/sym", None), ("mknod", m + "/fifo", None),
        ("link", m + "/hard", m + "/file"), ("rename", m + "/hard", m + "/new/hard"),
        ("unlink", m + "/new/hard", None), ("rmdir", m + "/dir", None)]
    for e in events:
        assert e["comm"].startswith("python3") and e["cmd"][-1] == "marker-arg"
        assert e["exe"].startswith("/") and e["uid"] == 0 and e["result"] == "ok"
        assert e["class"] == "persistent" and e["rule"] is None
        assert e["mount"] == m
    assert len({e["pid"] for e in events}) == 1


def test_no_log_writes_no_log(tmp_path):
    lower, mnt, st = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    lower.mkdir()
    mnt.mkdir()
    with RofsProcess(str(mnt), str(st), str(lower), ("--no-log",)):
        (mnt / "f").write_text("x")
    assert not os.path.exists(state.log_path(str(st), str(mnt)))


def test_rotation_keeps_every_event_readable(tmp_path):
    path = str(tmp_path / "mnt.jsonl")
    log = WriteLog(path, "/etc", max_bytes=4096, keep=3)
    try:
        for i in range(100):
            log.record("create", os.getpid(), 0, (b"f%d" % i,), None, "ok", "scratch")
            if i % 5 == 4:
                log.flush()
    finally:
        log.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["mnt.jsonl", "mnt.jsonl.1", "mnt.jsonl.2", "mnt.jsonl.3"]
    assert all(os.path.getsize(tmp_path / n) <= 4096 for n in names)
    events, files, _ = load_events([str(tmp_path)])
    assert files[-1] == path  # the current file is read last
    # The oldest files went beyond `keep`; what is left is the newest events, in order.
    numbers = [int(e["path"][6:]) for e in events]
    assert numbers == list(range(numbers[0], 100)) and numbers[0] > 0


def test_process_cache_notices_a_new_process_behind_the_same_pid(monkeypatch):
    cache = ProcessCache()
    me = cache.info(os.getpid())
    assert me[1] == os.readlink("/proc/self/exe")
    # Pretend time passed and the pid now belongs to a process with another start time.
    from rofs import writelog
    monkeypatch.setattr(writelog, "RECHECK_SECONDS", -1)
    monkeypatch.setattr(writelog, "_start_time", lambda pid: b"other")
    monkeypatch.setattr(writelog, "_read_process", lambda pid: ("new", "/bin/new", ["new"]))
    assert cache.info(os.getpid()) == ("new", "/bin/new", ["new"])


# ---------------------------------------------------- the report, the learn run


def workload(root, scratch_dir):
    """useradd, sed -i, ssh-keygen, and a program writing under a scratch path."""
    subprocess.run(["useradd", "--prefix", str(root), "-M", "-s", "/bin/sh", "rofsuser"],
                   check=True, capture_output=True)
    subprocess.run(["sed", "-i", "s/^127.0.0.1.*/127.0.0.1 localhost rofs-test/",
                    str(root / "etc" / "hosts")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test",
                    "-f", str(root / "etc" / "ssh" / "ssh_host_rofs_key")], check=True)
    subprocess.run(["sh", "-c", "mkdir -p %s/run && date > %s/run/stamp"
                    % (scratch_dir, scratch_dir)], check=True)


def check_kept(etc, lower):
    assert "rofsuser:" in (etc / "passwd").read_text()
    assert "rofsuser:" in (etc / "shadow").read_text()
    assert "rofsuser:" in (etc / "group").read_text()
    assert "rofs-test" in (etc / "hosts").read_text()
    assert (etc / "ssh" / "ssh_host_rofs_key").exists()
    assert (etc / "ssh" / "ssh_host_rofs_key.pub").exists()
    assert sorted(os.listdir(etc / "scratch")) == sorted(os.listdir(lower / "scratch"))


@pytest.fixture
def etc_copy(tmp_path):
    lower = tmp_path / "lower"
    subprocess.run(["cp", "-a", "/etc", str(lower)], check=True)
    (lower / "ssh").mkdir(exist_ok=True)
    shutil.rmtree(lower / "scratch", ignore_errors=True)
    (lower / "scratch").mkdir()
    (lower / "scratch" / "keep-me").write_text("lower\n")
    # Make sure the user does not exist in the copy already.
    for name in ("passwd", "shadow", "group", "gshadow"):
        p = lower / name
        if p.exists():
            p.write_text("".join(line for line in p.read_text().splitlines(True)
                                 if not line.startswith("rofsuser:")))
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    return lower, root


def test_learn_run_report_and_suggested_policy(tmp_path, etc_copy):
    lower, root = etc_copy
    etc = root / "etc"
    learn_policy = tmp_path / "learn.policy"
    learn_policy.write_text("default scratch\nscratch %s/scratch\n" % etc)
    learn_state = tmp_path / "learn-state"
    with RofsProcess(str(etc), str(learn_state), str(lower), ("--policy", str(learn_policy))):
        workload(root, etc / "scratch")

    report = rofs("report", str(learn_state)).stdout
    for program in ("/usr/sbin/useradd (useradd)", "/usr/bin/sed (sed)",
                    "/usr/bin/ssh-keygen (ssh-keygen)", "(mkdir)", "(sh)"):
        assert program in report, report
    for path in ("/passwd", "/shadow", "/group", "/hosts", "/ssh/ssh_host_rofs_key",
                 "/scratch/run/stamp"):
        assert str(etc) + path + "  " in report, report
    data = json.loads(rofs("report", "--json", str(learn_state)).stdout)
    sed = next(p for p in data["programs"] if p["names"] == ["sed"])
    assert str(etc / "hosts") in sed["paths"] and sed["refused"] == 0

    suggested = rofs("report", "--suggest", str(learn_state)).stdout
    lines = [line for line in suggested.splitlines() if not line.startswith("#")]
    assert lines[0] == "default scratch"
    kept = {line.split(None, 1)[1] for line in lines[1:]}
    for name in ("passwd", "shadow", "group", "gshadow", "hosts", "ssh/ssh_host_rofs_key",
                 "ssh/ssh_host_rofs_key.pub"):
        assert str(etc / name) in kept, suggested
    assert not any("/scratch" in k for k in kept), suggested  # its own rule: scratch
    # Temporaries and locks are not kept (the backups passwd- etc. are real changes).
    assert not any(k.endswith(("+", ".lock")) or "/sed" in k or k[-1].isdigit()
                   for k in kept), suggested

    # The suggested policy, from a fresh state: the workload keeps exactly that.
    policy = tmp_path / "suggested.policy"
    policy.write_text(suggested)
    fresh = tmp_path / "state"
    with RofsProcess(str(etc), str(fresh), str(lower), ("--policy", str(policy))):
        workload(root, etc / "scratch")
    with RofsProcess(str(etc), str(fresh), str(lower), ("--policy", str(policy))):
        check_kept(etc, lower)
        upper = fresh / str(etc).lstrip("/")
        found = {os.path.join(dirpath, name)[len(str(upper)):]
                 for dirpath, _, names in os.walk(upper) for name in names}
        # Exactly the suggested paths hold changes; the scratch stamp and the
        # temporaries are gone.
        assert found == {k[len(str(etc)):] for k in kept}


def test_report_merges_the_logs_of_several_hosts(tmp_path):
    for host, t0 in (("web1", 100.0), ("web2", 50.0)):
        with open(tmp_path / ("%s.jsonl" % host), "w") as f:
            for i in range(3):
                f.write(json.dumps({
                    "t": t0 + i, "host": host, "mount": "/etc", "pid": 10 + i, "uid": 0,
                    "comm": "sed", "exe": "/usr/bin/sed", "cmd": ["sed", "-i"],
                    "op": "rename", "path": "/etc/sedX%d" % i, "path2": "/etc/hosts",
                    "result": "ok", "class": "persistent", "rule": None}) + "\n")
        with open(tmp_path / ("%s.jsonl" % host), "a") as f:
            f.write('{"t": 1, "cut short')  # a crash in the middle of a line
    text = rofs("report", str(tmp_path / "web1.jsonl"), str(tmp_path / "web2.jsonl")).stdout
    assert text.startswith("6 changes and 0 refused writes by 1 program on 2 hosts, from 2 "
                           "log files\n")
    assert "2 log lines were not events (cut short?) and were skipped" in text
    assert "/usr/bin/sed (sed): 6 changes" in text and "hosts web1, web2" in text
    assert "/etc/hosts  rename (target) x6" in text
    data = json.loads(rofs("report", "--json", str(tmp_path)).stdout)
    (sed,) = data["programs"]
    assert sed["first"] == 50.0 and sed["last"] == 102.0 and sed["hosts"] == ["web1", "web2"]
