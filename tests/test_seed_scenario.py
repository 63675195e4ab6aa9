"""Acceptance: the seed's passwd story on a read-only /etc, in a private mount namespace
(the machine's own /etc is never touched)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fuse

SCRIPT = os.path.join(os.path.dirname(__file__), "scenario_passwd.py")


@pytest.mark.parametrize("tool", ["chpasswd", "passwd", "useradd", "pwck", "unshare"])
def test_tools_present(tool):
    import shutil
    assert shutil.which(tool) or os.path.exists("/usr/sbin/" + tool), tool


def caller_env():
    return {**os.environ, "ROFS_CALLER_MNT_NS": os.readlink("/proc/self/ns/mnt")}


def test_scenario_refuses_the_real_mount_namespace(tmp_path):
    for env in (os.environ, caller_env()):  # run directly, or without a new namespace
        result = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True,
                                text=True, timeout=60, env=env)
        assert result.returncode == 3 and "refusing" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("options", ["", "--no-open"])
def test_passwd_useradd_and_friends_on_rofs_etc(tmp_path, options):
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**caller_env(), "ROFS_SCENARIO_ARGS": options})
    print(result.stdout)
    print(result.stderr, file=sys.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scenario passed" in result.stdout
    assert "ok: lower byte-identical" in result.stdout
