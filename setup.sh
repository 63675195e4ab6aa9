#!/bin/sh
# Install what rofs needs to run on a Debian/Ubuntu machine: system packages (fuse3, for
# fusermount3 and /etc/fuse.conf; rofs speaks the FUSE protocol itself, so no compiler
# and no libfuse headers), a virtualenv in .venv with rofs in it, the command in
# /usr/local/bin, the systemd unit and the man page.  `./setup.sh --test` also installs
# what the tests need (test.sh runs it so).  Idempotent: what is there is kept.
set -eu
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs system packages)" >&2
    exit 1
fi
testing=
case "${1:-}" in
    --test) testing=1 ;;
    "") ;;
    *) echo "usage: setup.sh [--test]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
packages="fuse3 util-linux"
if [ -n "$testing" ]; then
    # useradd and ssh-keygen for the learning-run tests, git for etckeeper's case,
    # setfacl and getfacl for the ACL tests, mkfs.ext4/xfs/btrfs and mount for the
    # power-cut test, strace to count the daemon's system calls, procps for pgrep and ps
    # (how an operator finds the daemon).
    packages="$packages passwd openssh-client git acl e2fsprogs xfsprogs btrfs-progs mount strace linux-libc-dev procps"
fi

# Whether user nobody can run "$@" (a venv or checkout under /root, mode 0700 on
# Debian, is out of other users' reach).
others_can() {
    setpriv --reuid=65534 --regid=65534 --clear-groups env -i "$@" >/dev/null 2>&1
}

install_packages() {
    need=""
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" ||
            need="$need $pkg"
    done
    if [ -n "$need" ]; then
        echo "setup.sh: installing$need"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need
    fi
}

extra=""
command -v "$PYTHON" >/dev/null 2>&1 || extra="$extra python3"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    extra="$extra python3-venv"
fi
install_packages $packages $extra

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ -n "$testing" ]; then
    .venv/bin/python -m pip install --quiet -e '.[test]'
else
    .venv/bin/python -m pip install --quiet -e .
fi
# The command where systemd units and mount(8) helpers look for it, the unit where
# systemd looks for locally installed ones (enabling it is the admin's decision), and
# the man page the unit points to.
ln -sf "$(pwd)/.venv/bin/rofs" /usr/local/bin/rofs
install -D -m 644 rofs/systemd/rofs@.service /usr/local/lib/systemd/system/rofs@.service
install -D -m 644 docs/rofs.1 /usr/local/share/man/man1/rofs.1

# Users other than root run rofs too (docs/unprivileged.md), from this venv if they can
# reach it.
if ! others_can "$(pwd)/.venv/bin/python" -c 'import rofs'; then
    echo "setup.sh: note: $(pwd)/.venv is out of other users' reach (it, or the Python it was made from," \
         "is under a directory closed to them, like /root): only root can run rofs" \
         "from it; for other users, put the checkout where they can read it (e.g." \
         "/opt/rofs) and run setup.sh there" >&2
fi
echo "setup.sh: ready: $(.venv/bin/rofs --version) in $(pwd)/.venv"
