#!/usr/bin/env python3
"""The README's two commands on a fresh Debian root, the way a newcomer runs them.

A Debian bookworm root (debootstrap minbase, built once and cached) is copied, this
checkout is put where the README says (/opt/rofs: the files git tracks, as they are in
the work tree, and untracked ones not ignored), and systemd-nspawn runs in it, under
the conditions of a stock machine: /tmp a strictatime tmpfs (systemd's tmp.mount), the
stock soft open-file limit of 1,024, /proc/sys read-only and no loop devices (nspawn's
own defaults), nothing installed beyond minbase.  There it runs, exactly as the README
shows them, the quick start's set-up-and-mount command (then checks the mount, adds a
user and sets a password through it, and unmounts) and the test command.

    python3 tests/fresh_root.py [--cache DIR] [--keep] [-- TEST ARGS]

TEST ARGS go to the test command (pytest's: `-- -x tests/test_docs.py`).  Needs root,
debootstrap and systemd-nspawn (installed with apt-get when missing).  The exit code is
the container's: 0 when both commands passed.  It takes as long as the suite plus a few
minutes (the whole suite runs in the container), so it is not part of the suite: run it
before a change to set-up, tests' assumptions or the README's commands lands.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("ROFS_FRESH_ROOT_CACHE", "/var/cache/rofs-test/bookworm")
SUITE = "bookworm"
WHERE = "/opt/rofs"  # where the README puts the checkout


def readme_commands() -> tuple[str, str]:
    """The quick start's set-up-and-mount command and its test command, as written."""
    with open(os.path.join(CHECKOUT, "README.md")) as f:
        lines = [line.strip() for line in f if line.startswith("    ")]
    setup = [line for line in lines if line.startswith("./setup.sh")]
    test = [line for line in lines if line.startswith("./test.sh")]
    if len(setup) != 1 or len(test) != 1:
        raise SystemExit("fresh_root: README.md should show one ./setup.sh command and "
                         "one ./test.sh command, found %s" % (setup + test))
    return setup[0], test[0]


def ensure_tools() -> None:
    missing = [pkg for cmd, pkg in (("debootstrap", "debootstrap"),
                                    ("systemd-nspawn", "systemd-container"))
               if shutil.which(cmd) is None]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       check=True, env=env)


def cached_root(cache: str) -> str:
    """The minbase root, made once (a half-made one is never taken for it)."""
    if os.path.isfile(os.path.join(cache, "etc", "debian_version")):
        return cache
    partial = cache + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", SUITE, partial], check=True)
    os.rename(partial, cache)
    return cache


def checkout_files() -> list[str]:
    """The checkout as a newcomer gets it: what git tracks (as it is in the work tree)
    and untracked files that are not ignored; no .venv, no caches."""
    listed = subprocess.run(["git", "-C", CHECKOUT, "ls-files", "-z", "--cached",
                             "--others", "--exclude-standard"], capture_output=True,
                            check=True).stdout.split(b"\0")
    return sorted({os.fsdecode(p) for p in listed
                   if p and os.path.lexists(os.path.join(CHECKOUT, os.fsdecode(p)))})


def copy_checkout(root: str) -> None:
    target = root + WHERE
    os.makedirs(target)
    os.chmod(target, 0o755)
    files = "\0".join(checkout_files()).encode()
    pack = subprocess.Popen(["tar", "-C", CHECKOUT, "--null", "-T", "-", "-cf", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    unpack = subprocess.Popen(["tar", "-C", target, "-xf", "-"], stdin=pack.stdout)
    pack.stdout.close()
    pack.communicate(files)
    if unpack.wait() != 0 or pack.returncode != 0:
        raise SystemExit("fresh_root: copying the checkout failed")


# How this machine reaches the package registries, carried into the container as a
# machine on the same network would have it: a proxy, and a bundle of certificate
# authorities (with the host's local ones, /usr/local/share/ca-certificates, which the
# container's ca-certificates takes in when setup.sh installs it).
NETWORK_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                     "NO_PROXY", "PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
LOCAL_CAS = "/usr/local/share/ca-certificates"


def network_settings(root: str) -> list[str]:
    if os.path.isdir(LOCAL_CAS):
        shutil.copytree(LOCAL_CAS, root + LOCAL_CAS, dirs_exist_ok=True)
    return ["--setenv=%s=%s" % (name, os.environ[name]) for name in NETWORK_VARIABLES
            if name in os.environ]


def script(setup: str, test: str, test_args: list[str]) -> str:
    return "\n".join([
        "set -e",
        "cd " + WHERE,
        "echo '+ ' %s" % shlex.quote(setup),
        setup,
        "findmnt -no FSTYPE /etc | grep -qx fuse.rofs",
        "useradd -m newcomer && echo newcomer:fresh-root | chpasswd",
        "grep -q '^newcomer:' /var/lib/stateless/state/etc/shadow",
        "umount /etc",
        "echo 'fresh_root: the quick start mounted /etc; useradd and chpasswd worked'",
        "echo '+ ' %s" % shlex.quote(test),
        " ".join([test] + [shlex.quote(a) for a in test_args]),
    ])


def run(cache: str, keep: bool, test_args: list[str]) -> int:
    ensure_tools()
    base = tempfile.mkdtemp(prefix="rofs-fresh-root-", dir="/var/tmp")
    root = os.path.join(base, "root")
    try:
        subprocess.run(["cp", "-a", "--reflink=auto", cached_root(cache), root], check=True)
        copy_checkout(root)
        setup, test = readme_commands()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        stock = "1024:%s" % ("infinity" if hard == resource.RLIM_INFINITY else hard)
        # --as-pid2: an init that reaps orphans, as on a machine (a daemon that forked
        # into the background is adopted by it when its parent exits).
        command = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2",
                   "--directory", root, "--bind=/dev/fuse",
                   "--tmpfs=/tmp:mode=1777,strictatime", "--rlimit=NOFILE=" + stock,
                   "--setenv=DEBIAN_FRONTEND=noninteractive", *network_settings(root),
                   "/bin/bash", "-c", script(setup, test, test_args)]
        print("fresh_root: %s in %s" % (SUITE, root), flush=True)
        return subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    finally:
        if keep:
            print("fresh_root: kept %s" % root)
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", base])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=CACHE, help="the cached minbase root "
                        "(default %(default)s; made when missing)")
    parser.add_argument("--keep", action="store_true", help="keep the container's root")
    parser.add_argument("test_args", nargs="*", help="arguments for the test command")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (debootstrap, systemd-nspawn)")
    return run(args.cache, args.keep, args.test_args)


if __name__ == "__main__":
    sys.exit(main())
