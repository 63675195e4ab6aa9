"""rofs diff, rofs revert and rofs check, on live mounts and offline."""

import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import build_lower
from helpers import ROFS, RofsProcess, manifest, read_text, rofs_out

pytestmark = pytest.mark.fuse

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "state-tools.md")


@pytest.fixture
def over_itself(tmp_path):
    """rofs mounted over its own lower directory, as over /etc."""
    etc = tmp_path / "etc"
    etc.mkdir()
    build_lower(str(etc))
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "gone-dir").mkdir()
    (etc / "gone-dir" / "inside").write_text("x\n")
    (etc / "opaque").mkdir()
    (etc / "opaque" / "old").write_text("old\n")
    state = tmp_path / "state"
    return etc, state


def make_changes(m):
    (m / "added").write_text("new file\n")
    (m / "added-dir").mkdir()
    (m / "added-dir" / "f").write_text("in new dir\n")
    (m / "hosts").write_text("127.0.0.1 localhost\n10.0.0.1 db\n")
    os.chmod(m / "passwd", 0o600)
    os.chown(m / "d" / "file", 0, 0)
    os.setxattr(m / "ssh" / "sshd_config", "user.tag", b"1")
    os.utime(m / "shadow", (5, 5))
    os.unlink(m / "link")
    shutil.rmtree(m / "gone-dir")
    shutil.rmtree(m / "opaque")
    os.mkdir(m / "opaque")
    (m / "opaque" / "fresh").write_text("fresh\n")
    os.rename(m / "d" / "sub", m / "d" / "sub-moved")


def expected(m):
    """The example of docs/state-tools.md, for a mount at m instead of /etc."""
    with open(DOCS) as f:
        text = f.read()
    block = re.search(r"<!-- diff-example -->\s*```\n(.*?)```", text, re.S).group(1)
    return block.replace("/etc/", m + "/")


def test_diff_live_and_offline(over_itself):
    etc, state = over_itself
    lower = manifest(str(etc))
    with RofsProcess(str(etc), str(state)):
        make_changes(etc)
        live = rofs_out("diff", state)
        live_json = json.loads(rofs_out("diff", "--json", state))
        one = rofs_out("diff", state, etc / "d")
        patch = rofs_out("diff", "--patch", state, etc / "hosts")
    offline = rofs_out("diff", "--patch", state)
    assert manifest(str(etc)) == lower  # diff reads the lower without touching atimes
    offline = rofs_out("diff", state)
    m = str(etc)
    assert live == expected(m)
    assert offline == live
    assert {c["path"]: c["status"] for c in live_json}[m + "/opaque"] == "R"
    assert one.splitlines() == [line for line in live.splitlines()
                                if line.split()[1].startswith(m + "/d/")]
    assert patch.startswith("M %s/hosts  (content, mtime)\n--- a%s/hosts\n+++ b%s/hosts\n"
                            % (m, m, m))
    assert "+10.0.0.1 db\n" in patch


def test_diff_of_a_copied_state_against_the_image(over_itself, tmp_path):
    """A state dir copied to an image builder, next to the image's directory: --lower
    says where the lower is now (docs/readonly-root.md, folding state back)."""
    etc, state = over_itself
    with RofsProcess(str(etc), str(state)):
        make_changes(etc)
    original = rofs_out("diff", state)
    builder = tmp_path / "builder"
    builder.mkdir()
    subprocess.run(["cp", "-a", str(state), str(builder / "state")], check=True)
    subprocess.run(["cp", "-a", str(etc), str(builder / "etc")], check=True)
    shutil.rmtree(etc)  # the recorded lower is gone on the builder
    assert rofs_out("diff", "--lower", builder / "etc", builder / "state") == original
    # Without --lower the recorded lower is missing: an error, not every path "added",
    # and not every whiteout "over nothing" for check --repair to delete.
    rofs_out("diff", builder / "state", code=2)
    rofs_out("check", "--repair", builder / "state", code=2)
    rofs_out("diff", "--lower", builder / "nothing", builder / "state", code=2)
    assert rofs_out("check", "--lower", builder / "etc", builder / "state") == ""


def test_revert_every_kind_while_mounted(over_itself):
    etc, state = over_itself
    lower_hosts = read_text(etc / "hosts")
    with RofsProcess(str(etc), str(state)) as daemon:
        make_changes(etc)
        st_passwd = os.stat(etc / "passwd")
        assert read_text(etc / "hosts") != lower_hosts  # now in the kernel's page cache
        fd = os.open(etc / "added", os.O_RDONLY)  # an open file survives its revert
        # Listings the kernel may cache: a revert must not leave them stale.  (Listing
        # looks passwd-hardlink up, which links that name of the copied-up passwd in the
        # upper layer too; reverting passwd would leave it changed, so it goes too.)
        assert "added" in os.listdir(etc) and "sub-moved" in os.listdir(etc / "d")
        out = rofs_out("revert", etc / "hosts", etc / "passwd", etc / "passwd-hardlink",
                   etc / "added",
                   etc / "added-dir", etc / "link", etc / "gone-dir", etc / "opaque",
                   etc / "d" / "sub-moved", etc / "d" / "sub", etc / "shadow")
        assert out.splitlines()[0] == "reverted %s/hosts" % etc
        assert read_text(etc / "hosts") == lower_hosts
        assert os.stat(etc / "passwd").st_mode & 0o777 == 0o644 != st_passwd.st_mode & 0o777
        assert not (etc / "added").exists() and not (etc / "added-dir").exists()
        listing = os.listdir(etc)
        assert "added" not in listing and "added-dir" not in listing and "hosts" in listing
        assert sorted(os.listdir(etc / "d")) == ["file", "sub"]
        assert os.read(fd, 100) == b"new file\n"
        os.close(fd)
        assert os.readlink(etc / "link") == "passwd"
        assert read_text(etc / "gone-dir" / "inside") == "x\n"
        assert sorted(os.listdir(etc / "opaque")) == ["old"]
        assert not (etc / "d" / "sub-moved").exists()
        assert read_text(etc / "d" / "sub" / "deep" / "leaf") == "leaf\n"
        assert rofs_out("revert", etc / "hosts") == "unchanged %s/hosts\n" % etc
        remaining = rofs_out("diff", state).splitlines()
        assert remaining == ["M %s/d/file  (owner 1234:2345 -> 0:0)" % etc,
                             "M %s/ssh/sshd_config  (xattrs)" % etc]
        assert not daemon.internal_errors()
    # What is left survives a remount, and an offline revert does the rest.
    out = rofs_out("revert", "--state", state, etc / "d" / "file", etc / "ssh" / "sshd_config")
    assert out.splitlines() == ["reverted %s/d/file" % etc,
                                "reverted %s/ssh/sshd_config" % etc]
    assert rofs_out("diff", state) == ""


def test_revert_errors(over_itself, tmp_path):
    etc, state = over_itself
    result = subprocess.run(ROFS + ["revert", str(etc / "hosts")], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "not on a live rofs mount; name its state dir with --state" in result.stderr
    with RofsProcess(str(etc), str(state)):
        pass
    result = subprocess.run(ROFS + ["revert", "--state", str(state), str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not below any mount of" in result.stderr


def test_check_finds_and_repairs_damage(over_itself):
    etc, state = over_itself
    with RofsProcess(str(etc), str(state)):
        make_changes(etc)
    upper = state / str(etc).lstrip("/")
    work = state / ".rofs" / "work" / str(etc).lstrip("/")
    assert rofs_out("check", state) == ""  # a clean state dir
    # Damage it on purpose.
    (work / "#rofs.999.1").write_text("half a copy-up")
    os.mknod(upper / "nothing-here", 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "hosts", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "added", "trusted.overlay.rofs.ino", b"garbage")
    os.setxattr(upper / "added-dir", "trusted.overlay.opaque", b"maybe")
    os.mkdir(upper / "lost")
    os.setxattr(upper / "lost", "trusted.overlay.redirect", b"/no/such/dir")
    # A damaged state still mounts, and shows what it holds.
    with RofsProcess(str(etc), str(state)) as daemon:
        assert read_text(etc / "hosts").endswith("10.0.0.1 db\n")
        assert read_text(etc / "added") == "new file\n"
        assert not os.path.lexists(etc / "nothing-here")
        assert sorted(os.listdir(etc / "opaque")) == ["fresh"]
    assert not daemon.internal_errors(), daemon.output()
    (work / "#rofs.999.1").write_text("half a copy-up")  # the mount removed it
    found = rofs_out("check", state, code=1).splitlines()
    assert len(found) == 6, found
    for text in ("#rofs.999.1: left over by an interrupted operation",
                 "nothing-here: whiteout over nothing",
                 "hosts: trusted.overlay.opaque on a file",
                 "added: malformed trusted.overlay.rofs.ino marker",
                 "added-dir: opaque marker with value b'maybe'",
                 "lost: redirect to b'/no/such/dir', which the lower does not have"):
        assert any(text in line for line in found), (text, found)
    repaired = rofs_out("check", "--repair", state, code=1)
    assert "lost: redirect to b'/no/such/dir'" in repaired and "decide by hand" in repaired
    assert sum(line.startswith("repaired: ") for line in repaired.splitlines()) == 5
    os.rmdir(upper / "lost")
    assert rofs_out("check", state) == ""
    with RofsProcess(str(etc), str(state)):
        assert read_text(etc / "hosts").endswith("10.0.0.1 db\n")
        assert read_text(etc / "added") == "new file\n"
        assert not os.path.lexists(etc / "nothing-here")


def test_status_of_live_and_dead_mounts(over_itself, tmp_path):
    """rofs status: what each live mount says of itself; exit 1 (for monitoring) once a
    request failed inside the daemon, or when a daemon is gone."""
    etc, state = over_itself
    policy = tmp_path / "policy"
    policy.write_text("scratch %s/d\nread-only %s/passwd\n" % (etc, etc))
    daemon = RofsProcess(str(etc), str(state), args=("--policy", str(policy)),
                         env={"ROFS_FAULT_NAME": "boom"}).start()
    try:
        (etc / "hosts").write_text("changed\n")
        # Every mount (tests running in parallel may have one dead for a moment: 1).
        text = rofs_out("status", code=(0, 1))
        assert "%s: live, pid %d, up 0d 00:00:" % (etc, daemon.server()) in text
        assert "  state    %s (upper %s/%s, trusted.overlay.* markers)" % (
            state, state, str(etc).lstrip("/")) in text
        assert "  policy   default persistent; rules: 1 read-only, 1 scratch" in text
        assert "0 internal errors" in text
        (entry,) = json.loads(rofs_out("status", "--json", etc))
        assert entry["ok"] and entry["lower"] == str(etc) and entry["nodes"] > 1
        assert entry["log"] == str(state / ".rofs" / "log" / str(etc).lstrip("/")) + ".jsonl"
        with pytest.raises(OSError):
            os.stat(etc / "boom")
        (entry,) = json.loads(rofs_out("status", "--json", etc, code=1))
        assert entry["internal_errors"] == 1
        daemon.proc.kill()
        daemon.proc.wait()
        assert "dead: the daemon is gone" in rofs_out("status", etc, code=1)
    finally:
        daemon.stop()
    assert rofs_out("status", etc, code=1) == "%s: not a rofs mount\n" % etc


def test_typos_fail_and_a_path_inside_a_mount_is_its_mount(over_itself, tmp_path):
    """A typo must not look like success: revert of a path that is nowhere fails (the
    other paths are still reverted), check of a missing dir says so; status of a path
    inside a mount shows that mount."""
    etc, state = over_itself

    def run(*args):
        return subprocess.run(ROFS + [str(a) for a in args], capture_output=True,
                              text=True, timeout=60)

    with RofsProcess(str(etc), str(state)):
        (etc / "hosts").write_text("changed\n")
        result = run("revert", etc / "hots", etc / "hosts", etc / "passwd")
        assert result.returncode == 1
        assert result.stdout == "reverted %s/hosts\nunchanged %s/passwd\n" % (etc, etc)
        assert result.stderr == ("rofs revert: error: %s/hots: no such file or directory in "
                                 "the lower layer or the state\n" % etc)
        status = rofs_out("status", etc / "ssh")
        assert status.startswith("%s/ssh is inside the rofs mount %s:\n%s: live"
                                 % (etc, etc, etc))
    result = run("revert", "--state", state, etc / "nope")
    assert result.returncode == 1 and "nope: no such file or directory" in result.stderr
    result = run("check", tmp_path / "nonexistent")
    assert result.returncode == 2
    assert result.stderr == "rofs check: error: %s: no such directory\n" % (
        tmp_path / "nonexistent")
