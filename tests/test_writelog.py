"""The write log (who writes where) and `rofs report`, through real mounts."""

import json
import os
import re
import shutil
import socket
import subprocess

import pytest
from helpers import RofsProcess, run_rofs

from rofs.commands.report import load_events
from rofs.store import state
from rofs.store.policy import Class, load
from rofs.store.quoting import quote
from rofs.store.writelog import ProcessCache, WriteLog, read_cuts

pytestmark = pytest.mark.fuse


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
    assert names == ["mnt.cuts.json", "mnt.jsonl", "mnt.jsonl.1", "mnt.jsonl.2",
                     "mnt.jsonl.3"]
    assert all(os.path.getsize(tmp_path / n) <= 4096 for n in names)
    events, files, _ = load_events([str(tmp_path)])
    assert files[-1] == path  # the current file is read last
    # The oldest files went beyond `keep`; what is left is the newest events, in order,
    # and the ones rotated out are counted.
    numbers = [int(e["path"][6:]) for e in events]
    assert numbers == list(range(numbers[0], 100)) and numbers[0] > 0
    assert read_cuts(files) == [{"v": 1, "host": quote(socket.gethostname()),
                                 "mount": "/etc", "cuts": {"0": {"rotated": numbers[0]}}}]
    # Every file describes the process once, before its first event.
    for name in names[1:]:
        with open(tmp_path / name) as f:
            lines = [json.loads(line) for line in f]
        assert "op" not in lines[0] and lines[0]["cmd"] and len(
            [e for e in lines if "op" not in e]) == 1


def test_each_uid_has_its_own_files_and_the_biggest_loses_first(tmp_path, monkeypatch):
    """Users' files are kept within their account's total by removing the oldest file
    of the uid holding the most; root's and the system users' files are untouched."""
    from rofs.store import writelog
    monkeypatch.setattr(writelog, "USER_MAX_BYTES", 2048)
    monkeypatch.setattr(writelog, "ACCOUNT_MAX_BYTES", 8192)
    path = str(tmp_path / "mnt.jsonl")
    log = WriteLog(path, "/etc", max_bytes=1024, keep=8)  # root's rotate too
    try:
        log.record("create", os.getpid(), 33, (b"www",), None, "ok", "persistent")
        for i in range(200):  # uid 1000 makes many changes, 1001 a few, root some
            log.record("create", os.getpid(), 1000, (b"a%d" % i,), None, "ok", "scratch")
            if i % 20 == 0:
                log.record("create", os.getpid(), 1001, (b"b%d" % i,), None, "ok", "scratch")
                log.record("rename", os.getpid(), 0, (b"shadow",), None, "ok", "persistent")
            log.flush()
    finally:
        log.close()
    assert os.path.exists(path + ".1")
    sizes = {n: os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path)
             if ".uid-1" in n}
    assert sum(sizes.values()) <= 8192
    events, files, _ = load_events([str(tmp_path)])
    by_uid = {uid: [e for e in events if e["uid"] == uid] for uid in (0, 33, 1000, 1001)}
    assert len(by_uid[0]) == len(by_uid[1001]) == 10 and len(by_uid[33]) == 1
    cuts = read_cuts(files)[0]["cuts"]
    assert set(cuts) == {"1000"} and cuts["1000"]["rotated"] == 200 - len(by_uid[1000])


def test_process_cache_notices_a_new_process_behind_the_same_pid(monkeypatch):
    cache = ProcessCache()
    me = cache.info(os.getpid())
    assert me[1] == os.fsencode(os.readlink("/proc/self/exe"))
    # Pretend time passed and the pid now belongs to a process with another start time.
    from rofs.store import writelog
    monkeypatch.setattr(writelog, "RECHECK_SECONDS", -1)
    monkeypatch.setattr(writelog, "_start_time", lambda pid: b"other")
    new = (b"new", b"/bin/new", [b"new"], None)
    monkeypatch.setattr(writelog, "_read_process", lambda pid: new)
    assert cache.info(os.getpid())[:4] == new


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
    (lower / "hosts").write_text("127.0.0.1 localhost\n")  # a minimal root has none
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

    report = run_rofs("report", str(learn_state)).stdout
    for program in ("/usr/sbin/useradd (useradd)", "/usr/bin/sed (sed)",
                    "/usr/bin/ssh-keygen (ssh-keygen)", "(mkdir)", "(sh)"):
        assert program in report, report
    for path in ("/passwd", "/shadow", "/group", "/hosts", "/ssh/ssh_host_rofs_key",
                 "/scratch/run/stamp"):
        assert str(etc) + path + "  " in report, report
    data = json.loads(run_rofs("report", "--json", str(learn_state)).stdout)
    sed = next(p for p in data["programs"] if p["names"] == ["sed"])
    assert str(etc / "hosts") in sed["paths"] and sed["refused"] == 0

    suggested = run_rofs("report", "--suggest", str(learn_state)).stdout
    policy = tmp_path / "suggested.policy"
    policy.write_text(suggested)
    parsed = load(str(etc), str(lower), policy_file=str(policy))
    assert parsed.default is Class.SCRATCH
    assert all(r.cls is Class.PERSISTENT for r in parsed.rules.values())
    kept = {b"/".join(path).decode() for path in parsed.rules}
    for name in ("passwd", "shadow", "group", "gshadow", "hosts"):
        assert name in kept, suggested
    # ssh-keygen made new files in the existing ssh/: the directory is kept whole, so the
    # next key a program makes there is kept too.
    assert "ssh" in kept and "# whole: new entries appeared in it" in suggested
    assert not any(k.startswith("scratch") for k in kept), suggested  # its own rule
    # Temporaries and locks are not kept (the backups passwd- etc. are real changes).
    assert not any(k.endswith(("+", ".lock")) or "sed" in k or k[-1].isdigit()
                   for k in kept), suggested

    # The suggested policy, from a fresh state: the workload keeps exactly that.
    fresh = tmp_path / "state"
    with RofsProcess(str(etc), str(fresh), str(lower), ("--policy", str(policy))):
        workload(root, etc / "scratch")
    with RofsProcess(str(etc), str(fresh), str(lower), ("--policy", str(policy))):
        check_kept(etc, lower)
        upper = fresh / str(etc).lstrip("/")
        found = {os.path.join(dirpath, name)[len(str(upper)) + 1:]
                 for dirpath, _, names in os.walk(upper) for name in names}
        # Exactly the suggested paths hold changes; the scratch stamp and the
        # temporaries are gone.
        assert {f.split("/")[0] if f.startswith("ssh/") else f for f in found} == kept


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
    text = run_rofs("report", str(tmp_path / "web1.jsonl"), str(tmp_path / "web2.jsonl")).stdout
    assert text.startswith("6 changes and 0 refused writes by 1 program on 2 hosts, from 2 "
                           "log files\n")
    assert "2 log lines were not events (cut short?) and were skipped" in text
    assert "/usr/bin/sed (sed): 6 changes" in text and "hosts web1, web2" in text
    assert "/etc/hosts  rename (target) x6" in text
    data = json.loads(run_rofs("report", "--json", str(tmp_path)).stdout)
    (sed,) = data["programs"]
    assert sed["first"] == 50.0 and sed["last"] == 102.0 and sed["hosts"] == ["web1", "web2"]


def test_report_names_scripts_summarizes_and_ignores(tmp_path):
    """Changes a script makes are its own (not /usr/bin/dash's, not a 15-character
    comm); the report starts with a summary; --ignore and --ignore-file leave paths out;
    one change is "1 change"."""
    lower, mnt, st = tmp_path / "lower", tmp_path / "mnt", tmp_path / "state"
    (lower / ".git" / "objects").mkdir(parents=True)
    (lower / "ssl").mkdir()
    mnt.mkdir()
    script = tmp_path / "bin" / "update-ca-certificates"
    script.parent.mkdir()
    script.write_text("#!/bin/sh -e\necho cert > \"$1/ssl/ca.pem\"\n")
    script.chmod(0o755)
    with RofsProcess(str(mnt), str(st), str(lower)):
        subprocess.run([str(script), str(mnt)], check=True)
        subprocess.run(["sh", "-c", "echo a > %s/.git/objects/a && echo b > %s/.git/HEAD"
                        % (mnt, mnt)], check=True)
    report = run_rofs("report", "--state", str(st)).stdout
    m = str(mnt)
    lines = report.splitlines()
    assert lines[0] == "3 changes and 0 refused writes by 2 programs on 1 host, from 1 " \
                       "log file"
    assert lines[2] == "By program:" and "By directory:" in lines
    assert "%s (update-ca-certificates): 1 change," % script in report, report
    assert re.search(r"^ +1 +0  %s \(update-ca-certificates\)$" % re.escape(str(script)),
                     report, re.M), report
    assert re.search(r"^ +2 +0  %s/\.git$" % re.escape(m), report, re.M), report
    ignored = run_rofs("report", "--ignore", m + "/.git/**", str(st)).stdout
    assert m + "/.git" not in ignored and m + "/ssl/ca.pem  create" in ignored
    assert "2 events left out by the exceptions list and --ignore" in ignored
    patterns = tmp_path / "ignore"
    patterns.write_text("# per-machine churn\n%s/*/objects\n" % m)
    ignored = run_rofs("report", "--ignore-file", str(patterns), str(st)).stdout
    assert m + "/.git/objects" not in ignored and m + "/.git/HEAD" in ignored
    summary = run_rofs("report", "--summary", str(st)).stdout
    assert "By directory:" in summary and "    " + m + "/ssl/ca.pem" not in summary
    # The same patterns for rofs diff, and its summary.
    diff = run_rofs("diff", "--ignore", m + "/.git", "--state", str(st)).stdout
    assert diff == "A %s/ssl/ca.pem\n" % m
    diff = run_rofs("diff", "--summary", str(st)).stdout.splitlines()
    assert diff[0].startswith("3 changes (A added") and diff[2].split() == [
        "2", "0", "0", "0", m + "/.git"]


def test_script_of_interpreters():
    from rofs.store.writelog import script_of
    assert script_of(b"/usr/bin/dash", [b"/bin/sh", b"-e", b"/usr/sbin/update-ca"]) == \
        b"/usr/sbin/update-ca"
    assert script_of(b"/usr/bin/perl", [b"/usr/bin/perl", b"-w", b"--", b"/usr/sbin/x"]) \
        == b"/usr/sbin/x"
    assert script_of(b"/usr/bin/python3.11", [b"python3", b"-W", b"ignore", b"./tool"]) \
        == b"./tool"
    assert script_of(b"/usr/bin/bash", [b"bash", b"-c", b"echo > /etc/x"]) is None
    assert script_of(b"/usr/bin/sed", [b"sed", b"-i", b"s/a/b/", b"/etc/hosts"]) is None


def test_logs_written_before_names_were_escaped_are_read_the_same(tmp_path):
    """Lines without "v" held names decoded with surrogateescape; the report escapes
    them like today's, and finds the script of an interpreter in their command line."""
    event = {"t": 1.0, "host": "old", "mount": "/etc", "pid": 1, "uid": 0, "comm": "sh",
             "exe": "/usr/bin/dash", "cmd": ["/bin/sh", "/usr/sbin/update-ca"],
             "op": "create", "path": "/etc/caf\udce9\nD x", "result": "ok",
             "class": "persistent", "rule": None}
    (tmp_path / "old.jsonl").write_text(json.dumps(event) + "\n")
    report = run_rofs("report", str(tmp_path / "old.jsonl")).stdout
    assert "    /etc/caf\\xe9\\x0aD\\x20x  create\n" in report
    assert "/usr/sbin/update-ca (update-ca): 1 change," in report
