"""`rofs report --suggest` keeps what the workload needs, through real mounts.

The issue's case: etckeeper (a git repository in /etc) committing through the mount.
A suggestion that lists the new object files one by one loses the objects of the next
commit (they go to other .git/objects/xx/ directories) and `git fsck` then finds a
broken repository; a new file in an existing directory (cron.d) is lost the same way.
"""

import os
import shutil
import subprocess

import pytest
from helpers import ROFS, RofsProcess, view

from rofs.store.policy import Class, load

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(shutil.which("git") is None, reason="git is missing")]

# Commits with fixed names and dates make the same objects in every run.
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "rofs", "GIT_AUTHOR_EMAIL": "rofs@test",
           "GIT_COMMITTER_NAME": "rofs", "GIT_COMMITTER_EMAIL": "rofs@test",
           "GIT_AUTHOR_DATE": "2026-11-28T05:00:00Z",
           "GIT_COMMITTER_DATE": "2026-11-28T05:00:00Z", "HOME": "/nonexistent"}


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout


def commit(etc, message):
    git(etc, "add", "-A")
    git(etc, "commit", "-q", "-m", message)


def workload(etc):
    """An admin's session: an edit committed by etckeeper, a new cron job."""
    with open(etc / "hosts", "a") as f:
        f.write("10.0.0.1 db\n")
    (etc / "cron.d" / "backup").write_text("@hourly root backup\n")
    commit(etc, "db host, backup job")


def without_index(seen):
    """A view, but for the content of git's index, which caches the work tree's stat data
    (times, inode numbers): different in every run however the same work is done."""
    entries, links = seen
    return {k: v._replace(content=None, size=None) if k == ".git/index" else v
            for k, v in entries.items()}, links


@pytest.fixture
def image(tmp_path):
    """An image's /etc that is already a git repository with one commit (etckeeper)."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "hosts").write_text("127.0.0.1 localhost\n")
    (lower / "cron.d").mkdir()
    (lower / "cron.d" / "e2scrub").write_text("@weekly root e2scrub\n")
    for i in range(30):  # enough files for objects in many .git/objects/xx/
        (lower / ("conf%02d" % i)).write_text("setting %d\n" % i)
    git(lower, "init", "-q")
    commit(lower, "image")
    etc = tmp_path / "etc"
    etc.mkdir()
    return lower, etc, tmp_path


def test_suggested_policy_keeps_a_git_repository_and_new_files_whole(image):
    lower, etc, tmp = image
    learn = tmp / "learn-state"
    with RofsProcess(str(etc), str(learn), str(lower), ("--default", "scratch")):
        workload(etc)
        recorded = view(etc)
    suggestion = subprocess.run(ROFS + ["report", "--suggest", str(learn)], check=True,
                                capture_output=True, text=True).stdout
    policy = tmp / "suggested.policy"
    policy.write_text(suggestion)
    rules = load(str(etc), str(lower), policy_file=str(policy)).rules
    assert rules[(b".git",)].cls is Class.PERSISTENT, suggestion
    assert rules[(b"cron.d",)].cls is Class.PERSISTENT, suggestion
    assert not any(path[:1] == (b".git",) and len(path) > 1 for path in rules), suggestion

    # The suggested policy replayed on the recorded workload, then remounted: exactly
    # what the workload left.
    state = tmp / "state"
    with RofsProcess(str(etc), str(state), str(lower), ("--policy", str(policy))):
        workload(etc)
    with RofsProcess(str(etc), str(state), str(lower), ("--policy", str(policy))):
        assert without_index(view(etc)) == without_index(recorded)
        # The next commits and the next new cron job, which the learning run never saw.
        for i in range(30):
            # Not the image's size: a same-size change in the same second as the index
            # entry would be invisible to git's stat check below.
            (etc / ("conf%02d" % i)).write_text("changed here %d\n" % i)
        (etc / "cron.d" / "certbot").write_text("@daily root certbot renew\n")
        commit(etc, "second")
        (etc / "cron.d" / "logrotate").write_text("@daily root logrotate\n")
        commit(etc, "third")
    with RofsProcess(str(etc), str(state), str(lower), ("--policy", str(policy))):
        git(etc, "fsck", "--strict", "--no-dangling")
        assert git(etc, "log", "--format=%s").split("\n")[:4] == [
            "third", "second", "db host, backup job", "image"]
        assert sorted(os.listdir(etc / "cron.d")) == ["backup", "certbot", "e2scrub",
                                                      "logrotate"]
        # The work tree's files are scratch (only git's own directory is kept): they
        # show the image again, and git says so.
        assert (etc / "conf00").read_text() == "setting 0\n"
        assert "conf00" in git(etc, "status", "--porcelain")
