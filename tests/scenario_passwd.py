"""The seed's scenario, for real: shadow-utils on a read-only /etc, then on rofs.

Runs only inside a private mount namespace (`unshare -m --propagation private`) other
than its caller's, whose namespace the caller passes in ROFS_CALLER_MNT_NS; anywhere
else it refuses before touching anything.  The pytest wrapper (test_seed_scenario.py)
does all that.  Everything here happens to a copy of
/etc bound read-only over /etc in that namespace, and /home, /var/mail, /var/log and
/var/spool are private tmpfs mounts, so the machine's real files are never touched.

Exit status 0 means every check passed; failures are printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from helpers import (  # noqa: E402
    ROFS,
    is_rofs_mounted,
    kill_daemons,
    manifest,
    mounted_fstype,
    read_text,
)

USERS = ["rofsp%02d" % i for i in range(20)]


def sh(cmd: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, shell=True, input=stdin, capture_output=True, text=True,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError("%r failed (%d): %s%s" % (cmd, result.returncode, result.stdout,
                                                       result.stderr))
    return result


def shadow_hash(user: str) -> str:
    return sh("getent shadow %s" % user).stdout.split(":")[1]


def wait_daemon_gone(state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if state.encode() in f.read():
                        alive = True
            except OSError:
                pass
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError("rofs daemon still running after unmount")


def mount_rofs(state: str, *args: str) -> None:
    # $ROFS_SCENARIO_ARGS: more options for every mount (the --no-open run).
    args += tuple(os.environ.get("ROFS_SCENARIO_ARGS", "").split())
    result = subprocess.run(ROFS + ["/etc", "--state", state, *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert is_rofs_mounted("/etc"), "rofs returned before the mount was live"


def unmount_rofs(state: str) -> None:
    sh("umount /etc")
    wait_daemon_gone(state)
    assert mounted_fstype("/etc") != "fuse.rofs"


def pick(candidates, test):
    for name in candidates:
        path = os.path.join("/etc", name)
        if test(path):
            return path
    raise AssertionError("none of %r found in /etc" % (candidates,))


class Scenario:
    def __init__(self, work: str) -> None:
        self.work = work
        self.copy = os.path.join(work, "etc-copy")
        self.state = os.path.join(work, "state")
        self.checks: list = []
        self.mounts: list[str] = []

    def check(self, what: str, fn) -> None:
        fn()
        self.checks.append((what, fn))
        print("ok:", what, flush=True)

    def setup(self) -> None:
        sh("cp -a /etc %s" % self.copy)
        # The image's hosts, which sed -i edits (a minimal root has none).
        with open(os.path.join(self.copy, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
        for path in ("/home", "/var/mail", "/var/log", "/var/spool"):
            if os.path.isdir(path):
                sh("mount -t tmpfs tmpfs %s" % path)
                self.mounts.append(path)
        sh("mount --bind %s /etc" % self.copy)
        self.mounts.append("/etc")
        sh("mount -o remount,bind,ro /etc")

    def teardown(self) -> None:
        if is_rofs_mounted("/etc"):
            subprocess.run(["umount", "-l", "/etc"])
        kill_daemons(self.state)
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", path])

    def run(self) -> None:
        before = manifest(self.copy)
        fail = sh("chpasswd", stdin="root:fromreadonly\n", check=False)
        assert fail.returncode != 0, "chpasswd should fail on a read-only /etc"
        print("ok: chpasswd fails on the read-only /etc:", fail.stderr.strip().splitlines()[-1])
        baseline_pwck = sh("pwck -r", check=False)
        baseline_grpck = sh("grpck -r", check=False)

        mount_rofs(self.state)
        self.exercise(baseline_pwck, baseline_grpck)
        unmount_rofs(self.state)

        mount_rofs(self.state)
        for what, fn in self.checks:
            fn()
            print("ok after remount:", what, flush=True)
        unmount_rofs(self.state)

        self.stateless(os.path.join(self.work, "state-policy"))

        after = manifest(self.copy)
        changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        assert not changed, "lower modified: %r" % sorted(changed)[:20]
        print("ok: lower byte-identical (%d entries)" % len(before))

    def stateless(self, state: str) -> None:
        """docs/policy.md's example: /etc/shadow persistent, everything else scratch."""
        policy = os.path.join(self.work, "stateless.policy")
        with open(policy, "w") as f:
            f.write("default scratch\npersistent /etc/shadow\npersistent /etc/gshadow\n")
        hosts = read_text("/etc/hosts")
        mount_rofs(state, "--policy", policy)
        sh("chpasswd", stdin="root:stateless-pw\n")
        new_hash = shadow_hash("root")
        sh("sed -i '1i # scratch edit' /etc/hosts && touch /etc/rofs-scratch-only")
        assert read_text("/etc/hosts").startswith("# scratch edit\n")
        unmount_rofs(state)
        mount_rofs(state, "--policy", policy)
        assert_(shadow_hash("root") == new_hash)
        print("ok: with default scratch, the password change survives a remount")
        assert_(read_text("/etc/hosts") == hosts and not os.path.lexists("/etc/rofs-scratch-only"))
        print("ok: ... and the scratch changes do not")
        unmount_rofs(state)
        report = sh(" ".join(ROFS + ["report", state])).stdout
        assert_("(chpasswd)" in report and "/etc/shadow  rename (target)" in report)
        print("ok: rofs report names chpasswd and /etc/shadow")

    def exercise(self, baseline_pwck, baseline_grpck) -> None:
        old = shadow_hash("root")
        sh("chpasswd", stdin="root:secret-one\n")
        after_chpasswd = shadow_hash("root")
        self.check("chpasswd changed root's hash",
                   lambda: assert_(shadow_hash("root") not in ("", old)))
        sh("passwd root", stdin="pw-two\npw-two\n")
        after_passwd = shadow_hash("root")
        assert after_passwd != after_chpasswd
        self.check("passwd root changed it again",
                   lambda: assert_(shadow_hash("root") == after_passwd))

        sh("groupadd rofsgrp")
        self.check("groupadd", lambda: sh("getent group rofsgrp"))
        sh("useradd -m -l -s /bin/sh rofsuser")
        self.check("useradd", lambda: sh("getent passwd rofsuser"))
        sh("usermod -aG rofsgrp rofsuser")
        self.check("usermod -aG", lambda: assert_("rofsuser" in sh(
            "getent group rofsgrp").stdout.strip().split(":")[3].split(",")))
        sh("useradd -M -l rofsgone && userdel rofsgone")
        self.check("userdel", lambda: assert_(sh("getent passwd rofsgone",
                                                 check=False).returncode == 2))

        sh("sed -i '1i # edited through rofs' /etc/hosts")
        self.check("sed -i", lambda: assert_(read_text("/etc/hosts").startswith(
            "# edited through rofs\n")))

        link = pick(["os-release", "localtime", "mtab"], os.path.islink)
        sh("ln -sf /rofs/new-target %s" % link)
        self.check("ln -sf replaced the symlink %s" % link,
                   lambda: assert_(os.readlink(link) == "/rofs/new-target"))

        source = pick(["issue", "debian_version", "host.conf", "hostname"], os.path.isfile)
        sh("ln %s %s.rofs-link" % (source, source))
        self.check("ln of a lower file", lambda: assert_(
            os.lstat(source).st_ino == os.lstat(source + ".rofs-link").st_ino
            and os.lstat(source).st_nlink == 2))

        victim = pick(["issue.net", "networks", "ethertypes", "shells.rofs"], os.path.isfile)
        sh("rm %s" % victim)
        self.check("rm of a lower file", lambda: assert_(not os.path.lexists(victim)
                                                        and os.path.basename(victim)
                                                        not in os.listdir("/etc")))

        emptied = pick(["ld.so.conf.d", "profile.d", "logrotate.d"],
                       lambda p: os.path.isdir(p) and bool(os.listdir(p)))
        sh("rm -rf %s/* && rmdir %s && mkdir %s" % (emptied, emptied, emptied))
        self.check("rmdir + mkdir comes back empty", lambda: assert_(os.listdir(emptied) == []))

        moved = pick(["apt", "cron.daily", "init.d", "systemd", "X11"],
                     lambda p: os.path.isdir(p) and bool(os.listdir(p)) and p != emptied)
        content = sorted(os.listdir(moved))
        sh("mv %s %s.moved" % (moved, moved))
        self.check("mv of a lower directory", lambda: assert_(
            not os.path.exists(moved) and sorted(os.listdir(moved + ".moved")) == content))

        sh(" & ".join("useradd -m -l %s" % u for u in USERS) + " & wait")
        self.check("20 parallel useradd", lambda: [sh("getent passwd %s" % u) for u in USERS])
        self.check("pwck -r finds nothing new", lambda: assert_same(
            sh("pwck -r", check=False), baseline_pwck))
        self.check("grpck -r finds nothing new", lambda: assert_same(
            sh("grpck -r", check=False), baseline_grpck))


def assert_(condition: bool) -> None:
    if not condition:
        raise AssertionError("check failed")


def assert_same(result, baseline) -> None:
    if (result.returncode, result.stdout, result.stderr) != (
            baseline.returncode, baseline.stdout, baseline.stderr):
        raise AssertionError("was %d %r %r, now %d %r %r" % (
            baseline.returncode, baseline.stdout, baseline.stderr, result.returncode,
            result.stdout, result.stderr))


def in_private_mount_namespace() -> bool:
    """True only in a mount namespace other than the caller's: the scenario mounts over
    /etc, which must never be the machine's /etc.  The caller (test_seed_scenario.py)
    puts its own namespace in ROFS_CALLER_MNT_NS before running us under unshare -m."""
    caller = os.environ.get("ROFS_CALLER_MNT_NS")
    return bool(caller) and os.readlink("/proc/self/ns/mnt") != caller


def main() -> int:
    if not in_private_mount_namespace():
        print("scenario_passwd.py: refusing to run outside a private mount namespace "
              "(use: unshare -m --propagation private)", file=sys.stderr)
        return 3
    work = sys.argv[1]
    scenario = Scenario(work)
    try:
        scenario.setup()
        scenario.run()
    finally:
        scenario.teardown()
        shutil.rmtree(scenario.copy, ignore_errors=True)
    print("scenario passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
