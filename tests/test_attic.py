"""No policy change deletes saved changes: the attic, through real mounts.

A state dir holds changes saved under one policy; a mount with a policy that makes
their paths scratch moves them to STATE/.rofs/attic/ (and says so loudly), `rofs attic`
lists them, puts them back (live through the daemon, or offline) and drops them.
"""

import json
import os
import re

import pytest
from conftest import build_lower
from helpers import RofsProcess, run_rofs, view

pytestmark = pytest.mark.fuse


@pytest.fixture
def etc(tmp_path):
    """A lower directory that rofs is mounted over, as over /etc."""
    etc = tmp_path / "etc"
    etc.mkdir()
    build_lower(str(etc))
    (etc / "cron.d").mkdir()
    (etc / "cron.d" / "old-job").write_text("@daily true\n")
    return etc, tmp_path / "state", tmp_path


def save_changes(m):
    """What a host saves over time: edits, new files and dirs, deletions, a hard link."""
    (m / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home:/bin/sh\n")
    (m / "shadow").write_text("root:$6$new:20000:0:99999:7:::\n")
    (m / "cron.d" / "backup").write_text("@hourly backup\n")
    (m / "newdir").mkdir()
    (m / "newdir" / "inside").write_text("x\n")
    os.unlink(m / "link")
    os.chmod(m / "ssh", 0o755)


def saved_then(etc, state, policy, text):
    """Changes saved with no policy; then the policy file `text`.  What the saved changes
    looked like."""
    with RofsProcess(str(etc), str(state)):
        save_changes(etc)
        saved = view(etc)
    policy.write_text(text)
    return saved


def test_a_policy_change_moves_saved_changes_aside_and_they_come_back(etc):
    etc, state, tmp = etc
    m = str(etc)
    # The policy the issue saw deleting data: end-of-line comments, two paths on a line.
    policy = tmp / "stateless.policy"
    saved = saved_then(etc, state, policy, "default scratch   # forget the rest\n"
                       "persistent %s/shadow    # keep password changes\n"
                       "persistent %s/gshadow %s/subuid\n" % (m, m, m))
    with RofsProcess(m, str(state), args=("--policy", str(policy))) as proc:
        assert (etc / "shadow").read_text() == "root:$6$new:20000:0:99999:7:::\n"
        assert "alice" not in (etc / "passwd").read_text()
        assert sorted(os.listdir(etc / "cron.d")) == ["old-job"]
        assert not (etc / "newdir").exists() and os.readlink(etc / "link") == "passwd"
        status = run_rofs("status", m).stdout
        # passwd-hardlink too: view() met it, so it was linked in the upper layer.
        assert re.search(r"attic .*: 6 saved changes moved aside in 1 set", status), status
        listing = run_rofs("attic", state).stdout
        set_id = listing.split()[0]
        assert {"%s/%s" % (m, p) for p in ("passwd", "passwd-hardlink", "cron.d", "newdir",
                                           "link", "ssh")} \
            == {line.strip() for line in listing.splitlines()[2:]}
        # The live policy makes them scratch: restoring them there would hide nothing
        # and be set aside again, so it is refused, and nothing moves.
        refused = run_rofs("attic", "--restore", set_id, state, code=1)
        assert "policy makes it scratch" in refused.stderr
        assert run_rofs("attic", "--state", state).stdout == listing
    out = proc.output()
    assert re.search(r"WARNING .*policy: 6 saved changes under paths this policy makes "
                     r"scratch moved to \S+/attic/\S+/%s instead of being deleted" % set_id,
                     out), out
    assert "gshadow matches nothing in the lower layer or the state" in out
    info = json.loads((state / ".rofs" / "attic" / m.lstrip("/") / set_id / "info.json")
                      .read_text())
    assert info["complete"] and "the default class" in info["reason"]
    # The admin fixes the policy, mounts again (nothing more moves), and restores live.
    with RofsProcess(m, str(state)) as proc:
        assert sorted(os.listdir(etc / "cron.d")) == ["old-job"]  # looked up before
        restored = run_rofs("attic", "--restore", set_id, state).stdout
        assert restored.count("restored ") == 6
        assert view(etc) == saved
        assert run_rofs("attic", state).stdout == "the attic is empty\n"
    assert "WARNING" not in proc.output()


def test_offline_restore_of_some_paths_and_drop(etc):
    etc, state, tmp = etc
    m = str(etc)
    policy = tmp / "p"
    saved = saved_then(etc, state, policy, "scratch %s/passwd %s/cron.d\n" % (m, m))
    with RofsProcess(m, str(state), args=("--policy", str(policy))):
        assert "alice" not in (etc / "passwd").read_text()
    set_id = run_rofs("attic", state).stdout.split()[0]
    # Not mounted: restored under the upper layer's lock.  A path not in the set is an
    # error, and so is a set that does not exist.
    assert "not in attic set" in run_rofs("attic", "--restore", set_id, state, m + "/hosts",
                                      code=2).stderr
    assert "no attic set nope" in run_rofs("attic", "--restore", "nope", state, code=2).stderr
    assert run_rofs("attic", "--restore", set_id, state, m + "/passwd").stdout == \
        "restored %s/passwd\n" % m
    with RofsProcess(m, str(state)):
        assert "alice" in (etc / "passwd").read_text()
        assert sorted(os.listdir(etc / "cron.d")) == ["old-job"]
    assert run_rofs("attic", "--drop", set_id, "--state", state).stdout.startswith(
        "dropped %s" % set_id)
    with RofsProcess(m, str(state)):
        after = view(etc)
    assert after != saved and "cron.d/backup" not in after[0]
    assert run_rofs("attic", state).stdout == "the attic is empty\n"


def test_a_hard_link_set_aside_leaves_the_index_and_comes_back_whole(etc):
    """A copied-up lower hard link whose upper name moves to the attic: its other lower
    name shows the lower file again; restored, both names are one file again."""
    etc, state, tmp = etc
    m = str(etc)
    with RofsProcess(m, str(state)):
        with open(etc / "passwd", "a") as f:  # passwd-hardlink is not looked up yet
            f.write("bob:x:1001:1001::/home/bob:/bin/sh\n")
    policy = tmp / "p"
    policy.write_text("scratch %s/passwd\n" % m)
    with RofsProcess(m, str(state), args=("--policy", str(policy))):
        assert "bob" not in (etc / "passwd-hardlink").read_text()
    set_id = run_rofs("attic", state).stdout.split()[0]
    run_rofs("attic", "--restore", set_id, state)
    with RofsProcess(m, str(state)):
        assert "bob" in (etc / "passwd-hardlink").read_text()
        assert os.stat(etc / "passwd").st_ino == os.stat(etc / "passwd-hardlink").st_ino
        assert os.stat(etc / "passwd").st_nlink == 2
