"""Every command shown in the README and docs/ is run here, exactly as written, or has a
stated reason why a test cannot run it (a reboot, a package manager, systemd as PID 1)
or where another test runs it.

A command block is an indented code block (four spaces more than the text before it,
after a blank line).  Each one is keyed by its first line in BLOCKS below; a block
missing there, or an entry matching no block, fails test_every_block_is_known.

Runnable blocks run in a private mount namespace that looks like the machine the docs
talk about, without touching this one: `/etc` is a copy of this machine's `/etc`
(bound read-only, or writable where the docs edit the image), and tmpfs covers
/var/lib (but dpkg's database), /srv, /mnt, /run, /opt, /usr/local/bin and
/usr/local/lib (with the `rofs` command of this checkout, and the checkout at its own
path, wherever that is, and at /opt/rofs).  A *situation* prepares what the block
expects (rofs mounted with changes, a dead mount, a copied state on an image
builder); `check` is run after the block.  Every process left in the namespace is
killed at the end.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field

import pytest

from rofs import cli

pytestmark = pytest.mark.fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                                   for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def blocks() -> list[tuple[str, int, str]]:
    """(file, line, dedented text) of every indented code block."""
    out = []
    for name in DOC_FILES:
        with open(os.path.join(ROOT, name)) as f:
            lines = f.read().split("\n")
        text_indent, blank, i = 0, True, 0
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip(" "))
            if line.strip() and blank and indent >= text_indent + 4:
                start, body = i, []
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip(" ")) >= indent):
                    body.append(lines[i])
                    i += 1
                out.append((name, start + 1, textwrap.dedent("\n".join(body)).strip() + "\n"))
                blank = True
                continue
            if line.strip():
                # a list item's text is indented by its marker
                text_indent = indent + (len(re.match(r"(\d+\.|[-*]) +|", line.lstrip())
                                            .group(0)))
            blank = not line.strip()
            i += 1
    return out


@dataclass
class Block:
    """How a block is tested.  `situation` None: not run, `reason` says why."""

    situation: str | None = None
    reason: str = ""
    check: str = ""  # shell run after the block
    skip_lines: dict[str, str] = field(default_factory=dict)  # line -> why not run
    replace: dict[str, str] = field(default_factory=dict)  # line -> shell that tests it
    expect: str | None = None  # the block is output: the situation must print it


SYSTEMD = "needs systemd as PID 1 (tests/test_systemd.py runs the unit's ExecStart/ExecStop)"
SYNOPSIS = "synopsis with placeholders; test_synopsis checks every option it names"
MOUNTED = "findmnt -no FSTYPE /etc | grep -qx fuse.rofs"
# The README's fstab line, mounted through `mount -T` with a file holding just it.
FSTAB_LINE = ("rofs  /etc  fuse.rofs  state=/var/lib/stateless/state,policy=/etc/rofs/etc.policy,"
              "x-systemd.requires-mounts-for=/var/lib/stateless/state  0 0")
FSTAB = ("printf '%%s\\n' %s > /run/fstab && mount -T /run/fstab /etc && %s && umount /etc"
         % (shlex.quote(FSTAB_LINE), MOUNTED))

POLICY_MOUNTS = [
    "rofs /etc --state /var/lib/stateless/state --policy /etc/rofs/etc.policy",
    "rofs /etc --state /var/lib/stateless/state --rwtab --default scratch",
    "rofs /etc --state /var/lib/stateless/state --rwtab --scratch /run/rofs-scratch"]
ATTIC_RESTORE = "rofs attic --restore 20261128T050000Z /var/lib/stateless/state"
REVERT_OFFLINE = ("rofs revert --state /var/lib/stateless/state /etc/hosts     "
                  "# not mounted")

BLOCKS: dict[str, Block] = {
    # README.md
    "./setup.sh && mkdir -p /var/lib/stateless && .venv/bin/rofs /etc --state "
    "/var/lib/stateless/state": Block("checkout", check=MOUNTED),
    "./test.sh": Block(reason="the command that runs this test (.ci/run runs it in CI)"),
    "rofs MOUNTPOINT --state STATEDIR [--lower DIR] [--policy FILE] [--rwtab [ETCDIR]]":
        Block(reason=SYNOPSIS),
    "mount -t overlay overlay -o lowerdir=/etc,upperdir=/var/lib/stateless/state/etc,"
    "workdir=/var/lib/stateless/state/.rofs/work/etc,redirect_dir=on /etc": Block(
        "unmounted", check="grep -q 10.0.0.1 /etc/hosts && umount /etc"),
    "echo 'ROFS_STATE=/var/lib/stateless/state' > /etc/default/rofs": Block(
        "image", skip_lines={"systemctl enable --now rofs@etc.service": SYSTEMD},
        check="grep -qx ROFS_STATE=/var/lib/stateless/state /etc/default/rofs"),
    "mount -t fuse.rofs rofs /etc -o state=/var/lib/stateless/state": Block(
        "policy-in-image", replace={
            "mount -t fuse.rofs rofs /etc -o state=/var/lib/stateless/state":
                "mount -t fuse.rofs rofs /etc -o state=/var/lib/stateless/state && "
                + MOUNTED + " && umount /etc",
            FSTAB_LINE: FSTAB}),
    # docs/performance.md
    ".venv/bin/python benchmarks/run.py            # 3 rounds, full sizes, ~12 minutes":
        Block(reason="8 minutes; its --quick form is run by tests/test_benchmarks.py"),
    # docs/policy.md
    "rofs /etc --state /var/lib/stateless/state --policy /etc/rofs/etc.policy\n"
    "rofs /etc --state /var/lib/stateless/state --rwtab --default scratch": Block(
        "policy-in-image", replace={line: line + " && %s && umount /etc" % MOUNTED
                                    for line in POLICY_MOUNTS}),
    "rofs: error: /etc/rofs/etc.policy:2: `scratch` needs a PATH": Block(
        "bad-policy", expect="rofs /etc --state /var/lib/stateless/state --policy "
        "/etc/rofs/etc.policy"),
    "DIR/upper/<MOUNTPOINT without its leading slash>/   the scratch changes": Block(
        reason="a layout, not a command (test_scratch_layer checks it)"),
    "rofs: WARNING rofs.daemon.serve: policy: /etc/rofs/etc.policy:3: persistent /etc/shadw":
        Block(reason="sample output; tests/test_attic.py checks this warning"),
    "STATEDIR/.rofs/attic/<MOUNTPOINT without its leading slash>/<ID>/tree/...": Block(
        reason="a layout, not a command (tests/test_attic.py checks it)"),
    # docs/image-updates.md
    "M /etc/group  (content, mtime)  [image changed: conflict]": Block(
        reason="sample output; tests/test_image_updates.py checks these tags"),
    # docs/state-tools.md
    "rofs revert /etc/hosts /etc/ssh": Block(
        "mounted", replace={REVERT_OFFLINE: "umount /etc && " + REVERT_OFFLINE},
        check="fails grep -q 10.0.0.1 /var/lib/stateless/state/etc/hosts"),
    "rofs status\nrofs status --json /etc": Block("mounted"),
    "rofs restart /etc                # systemd: systemctl reload rofs@etc": Block(
        "mounted", check=MOUNTED + " && rofs status /etc | grep -q 'replaced 1 time'"),
    "rofs attic /var/lib/stateless/state": Block("attic", replace={
        ATTIC_RESTORE: "rofs attic --restore $(rofs attic /var/lib/stateless/state | "
                       "awk 'NR == 1 {print $1}') /var/lib/stateless/state"},
        check="grep -q 10.0.0.1 /etc/hosts && test ! -e /var/lib/stateless/state/.rofs/"
              "attic/etc/* && umount /etc"),
    "/etc: live, pid 812, up 0d 03:12:55": Block(
        reason="sample output; tests/test_state_tools.py checks its lines"),
    # docs/troubleshooting.md
    "umount -l /etc              # a user's own mount: fusermount3 -u -z MOUNTPOINT":
        Block("dead", check=MOUNTED),
    "rofs report /var/lib/stateless/state | grep REFUSED": Block("mounted"),
    "rofs report --suggest /var/lib/stateless/state": Block("mounted"),
    "rofs diff /var/lib/stateless/state          # A, M (and what), D, R per path": Block(
        "mounted"),
    "mount -t overlay overlay -o lowerdir=/etc,upperdir=/var/lib/stateless/state/etc,"
    "workdir=/var/lib/stateless/state/.rofs/work/etc,redirect_dir=on /mnt": Block(
        "unmounted", check="grep -q 10.0.0.1 /mnt/hosts && umount /mnt"),
    # docs/unprivileged.md
    "rofs ~/project --state ~/.local/state/rofs": Block(
        reason="as a user other than root: tests/test_unprivileged.py mounts the same "
        "way as nobody"),
    "mount -t overlay overlay -o lowerdir=L,upperdir=STATE/M,workdir=STATE/.rofs/work/M,"
    "userxattr TARGET": Block(
        reason="a template; tests/test_unprivileged.py mounts a user's state this way"),
    # docs/write-log.md
    "rofs report /var/lib/stateless/state": Block("hosts"),
    # docs/readonly-root.md
    "mkdir -p /var/lib/stateless": Block(
        "image", replace={"# ... the workload ...":
                          "echo 10.0.0.1 db >> /etc/hosts && sleep 1.5"},
        check="grep -qx 'persistent /etc/hosts' /etc/rofs/etc.policy"),
    "cd /opt/rofs && ./setup.sh": Block(
        reason="the README's ./setup.sh, run above from the checkout"),
    "mkfs.ext4 -L stateless-state /dev/sdb1": Block(
        reason="formats a disk and edits the boot fstab"),
    "printf 'ROFS_STATE=/var/lib/stateless/state\\nROFS_OPTIONS=\\n' > /etc/default/rofs":
        Block("image", skip_lines={"systemctl enable rofs@etc.service": SYSTEMD},
              check="grep -qx ROFS_OPTIONS= /etc/default/rofs"),
    "UUID=...  /  ext4  ro,errors=remount-ro  0  1": Block(
        reason="an fstab line for the root filesystem"),
    "findmnt /etc                     # fuse.rofs": Block(
        "mounted", replace={"passwd root                      # works: /etc/shadow "
                            "lands in the state": "echo 'root:rofs-docs' | chpasswd"},
        check="grep -q '^root:' /var/lib/stateless/state/etc/shadow"),
    "systemctl stop rofs@etc.service": Block(
        reason="stops a unit and upgrades the running system's root"),
    "dnf install fuse3 python3": Block(
        reason="Fedora: CI runs Debian"),
    "systemd.mask=rofs@etc.service": Block(reason="a kernel command line parameter"),
    "mkdir -p /mnt/etc-merged": Block("unmounted"),
    "rofs check /var/lib/stateless/state": Block("unmounted"),
    "mv /var/lib/stateless/state/etc /var/lib/stateless/state/etc.old": Block(
        "unmounted", check="rofs /etc --state /var/lib/stateless/state && "
        "fails grep -q 10.0.0.1 /etc/hosts && umount /etc"),
    "mkdir -p /etc/rofs": Block(
        "rwtab", check="diff /etc/rofs/etc.policy /run/expected.policy"),
    "rofs /etc --state /var/lib/stateless/state --policy /etc/rofs/etc.policy\numount /etc":
        Block("policy-in-image"),
    "IMAGE=/srv/image/rootfs STATE=/srv/host1/state": Block(
        "builder", check="grep -q 10.0.0.1 /srv/image/rootfs/etc/hosts && "
        "cmp /srv/image/rootfs/etc.old/hostname /srv/image/rootfs/etc/hostname && "
        "test ! -e /srv/image/rootfs/etc/gone-file"),
}

# What a situation sets up before the block, in the namespace (bash, `set -e`).
CHANGES = """
LOG=/var/lib/stateless/state/.rofs/log/etc.jsonl
echo 10.0.0.1 db >> /etc/hosts
echo '# changed' >> /etc/ssh/sshd_config
echo changed-key > /etc/ssh/ssh_host_ed25519_key
echo other-name > /etc/hostname
rm /etc/gone-file
fails sh -c 'echo refused >> /etc/issue'
for i in $(seq 200); do grep -qs 'etc/issue"' $LOG && break; sleep 0.05; done
grep -qs 'etc/issue"' $LOG  # the write log (written every second) has the last change
"""
MOUNT = ("mkdir -p /var/lib/stateless && printf 'read-only /etc/issue\\n' > /run/ro.policy"
         " && rofs /etc --state /var/lib/stateless/state --policy /run/ro.policy")
SITUATIONS = {
    "checkout": "cd $CHECKOUT",
    "image": "",
    "policy-in-image": "mkdir -p /etc/rofs /run/rofs-scratch && "
                       "printf 'default scratch\\npersistent /etc/shadow\\n' > "
                       "/etc/rofs/etc.policy && mount -o remount,bind,ro /etc",
    "bad-policy": "mkdir -p /etc/rofs && printf 'default scratch\\nscratch\\n' > "
                  "/etc/rofs/etc.policy",
    "mounted": MOUNT + CHANGES,
    "unmounted": MOUNT + CHANGES + "umount /etc",
    "dead": MOUNT + CHANGES + "kill -9 $(sed 's/.*\"keeper\": \\([0-9]*\\).*/\\1/' "
            "/run/rofs/*.json)\n"
            "fails ls /etc",
    "hosts": MOUNT + CHANGES + "umount /etc\ncd /run && mkdir host1 host2 host3 && "
             "cp -a /var/lib/stateless/state host1/ && "
             "cp /var/lib/stateless/state/.rofs/log/etc.jsonl host2/etc.jsonl && "
             "cp /var/lib/stateless/state/.rofs/log/etc.jsonl host3/etc.jsonl.1",
    "builder": MOUNT + CHANGES + "umount /etc\nmkdir -p /srv/image/rootfs /srv/host1 && "
               "cp -a /etc /srv/image/rootfs/ && "
               "cp -a /var/lib/stateless/state /srv/host1/",
    # A state that kept everything, then mounted with a policy that makes it scratch.
    "attic": MOUNT + CHANGES + "umount /etc\n" + "printf "
             "'default scratch\\npersistent /etc/shadow\\n' > /run/stateless.policy && "
             "rofs /etc --state /var/lib/stateless/state --policy /run/stateless.policy && "
             "fails grep -q 10.0.0.1 /etc/hosts",
    "rwtab": "mkdir -p /etc/rwtab.d /etc/statetab.d\n"
             "printf 'files /etc/resolv.conf\\ndirs /var/cache/man\\nempty /etc/empty\\n'"
             " > /etc/rwtab.d/test\n"
             "printf '# auth\\n/etc/passwd\\n/etc/shadow\\n/var/lib/x\\n'"
             " > /etc/statetab.d/system-auth\n"
             "printf 'files /etc/resolv.conf\\nempty /etc/empty\\npersistent /etc/passwd\\n"
             "persistent /etc/shadow\\n' > /run/expected.policy",
}

PRELUDE = """
set -e
fails() {  # `! cmd` does not stop a `set -e` script
    if "$@" 2>/dev/null; then echo "should have failed: $*" >&2; exit 1; fi
}
echo $(readlink /proc/self/ns/mnt) > "$BASE/ns"
# rofs mounts of this machine (other tests) are not the docs' machine's: drop the copies
for m in $(findmnt -rn -t fuse.rofs -o TARGET); do umount -l "$m"; done
# What the tmpfs mounts below would hide, kept reachable first: dpkg's database (setup.sh
# asks dpkg what is installed) and the checkout, wherever it is (the README puts it in
# /opt/rofs); both are put back at their own paths, and the checkout at /opt/rofs too.
mount --bind /var/lib/dpkg "$BASE/dpkg"
mount --bind "$CHECKOUT" "$BASE/checkout"
for d in /usr/local/bin /usr/local/lib /usr/local/share /var/lib /srv /mnt /run /opt; do
    mount -t tmpfs -o mode=755 rofs-docs "$d"
done
mkdir /var/lib/dpkg && mount --bind "$BASE/dpkg" /var/lib/dpkg
mkdir -p "$CHECKOUT" /opt/rofs
test -e "$CHECKOUT/README.md" || mount --bind "$BASE/checkout" "$CHECKOUT"
mountpoint -q /opt/rofs || mount --bind "$BASE/checkout" /opt/rofs
ln -s "$CHECKOUT/.venv/bin/rofs" /usr/local/bin/rofs
mount --bind "$BASE/etc" /etc
mkdir -p /var/lib/stateless
"""


def checked(lines: list[str]) -> str:
    """Each line run on its own, stopping at the first that fails: `set -e` alone lets
    `a && b` with a failing `a` pass, and a line's own comment must stay a comment."""
    return "\n".join("eval %s || { echo 'failed: '%s >&2; exit 1; }"
                     % (shlex.quote(line), shlex.quote(line))
                     for line in lines if line.strip())


def namespace_script(key: str, spec: Block) -> list[str]:
    lines = []
    for line in key_block(key).splitlines():
        if line in spec.skip_lines:
            lines.append(": 'not run: %s'" % spec.skip_lines[line].replace("'", ""))
        else:
            lines.append(spec.replace.get(line, line))
    return lines


def key_block(key: str) -> str:
    for _, _, text in blocks():
        if text.startswith(key):
            return text
    raise KeyError(key)


def test_every_block_is_known():
    found = blocks()
    unknown = ["%s:%d: %s" % (f, n, t.splitlines()[0]) for f, n, t in found
               if not any(t.startswith(k) for k in BLOCKS)]
    assert not unknown, "classify these blocks in BLOCKS:\n" + "\n".join(unknown)
    stale = [k for k in BLOCKS if not any(t.startswith(k) for _, _, t in found)]
    assert not stale, "no such block any more: %s" % stale
    for key, spec in BLOCKS.items():
        assert spec.situation or spec.reason, key
        for line in list(spec.skip_lines) + list(spec.replace):
            assert line in key_block(key).splitlines(), (key, line)


def test_synopsis():
    """The README's synopsis names only options the commands have."""
    text = key_block("rofs MOUNTPOINT --state STATEDIR")
    sub = None
    for line in text.splitlines():
        words = line.split()
        if not line.startswith(" "):  # an indented line continues the one above
            sub = words[1] if len(words) > 1 and words[1] in cli.COMMANDS else None
        command = ["rofs"] + ([sub] if sub else []) + ["--help"]
        helptext = subprocess.run(command, capture_output=True, text=True).stdout
        for option in re.findall(r"(?<![\w=])(--?[a-z][-a-z]*)", line):
            assert re.search(r"(^|[\s,\[])%s\b" % re.escape(option), helptext), (line, option)


RUNNABLE = [k for k, spec in BLOCKS.items() if spec.situation]


@pytest.mark.parametrize("key", RUNNABLE, ids=[k.splitlines()[0][:50] for k in RUNNABLE])
def test_block_runs(key):
    spec = BLOCKS[key]
    base = tempfile.mkdtemp(prefix="rofs-docs-", dir="/tmp")
    try:
        os.mkdir(os.path.join(base, "dpkg"))
        os.mkdir(os.path.join(base, "checkout"))
        subprocess.run(["cp", "-a", "/etc", os.path.join(base, "etc")], check=True)
        etc = os.path.join(base, "etc")
        os.makedirs(os.path.join(etc, "ssh"), exist_ok=True)
        for name, text in (("hosts", "127.0.0.1 localhost\n"), ("hostname", "image\n"),
                           ("gone-file", "in the image\n"), ("issue", "Debian\n"),
                           ("ssh/sshd_config", "Port 22\n"), ("ssh/ssh_config", "Host *\n"),
                           ("ssh/ssh_host_ed25519_key", "image-key\n")):
            with open(os.path.join(etc, name), "w") as f:
                f.write(text)
        if spec.situation not in ("image", "policy-in-image",
                                  "bad-policy", "rwtab"):
            # the image's /etc, read-only, as on the machine the docs describe
            prepare = "mount -o remount,bind,ro /etc\n"
        else:
            prepare = ""
        if spec.expect is not None:
            body = ["fails " + spec.expect, spec.expect + " 2>&1 | cat"]
        else:
            body = namespace_script(key, spec)
        script = "\n".join([PRELUDE, prepare, checked(SITUATIONS[spec.situation]
                                                      .splitlines()),
                            checked(body), checked([spec.check]), "exit 0"])
        env = dict(os.environ, BASE=base, CHECKOUT=ROOT)
        env.pop("ROFS_RUN_DIR", None)  # the docs' machine: /run/rofs (a tmpfs here)
        result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                                 script], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, "%s\n--- stdout\n%s--- stderr\n%s" % (
            "\n".join(body), result.stdout, result.stderr)
        if spec.expect is not None:
            assert result.stdout == key + "\n"
    finally:
        _kill_namespace(base)
        shutil.rmtree(base, ignore_errors=True)


def _kill_namespace(base: str) -> None:
    """SIGKILL every process left in the test's mount namespace (daemons it started)."""
    try:
        with open(os.path.join(base, "ns")) as f:
            ns = f.read().strip()
    except OSError:
        return
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink("/proc/%s/ns/mnt" % pid) == ns:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
