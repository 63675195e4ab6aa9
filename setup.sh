#!/bin/sh
# Install everything rofs needs on a Debian/Ubuntu machine: system packages (FUSE 3,
# headers to build pyfuse3), a virtualenv in .venv, and rofs itself with its test extra.
# Idempotent: packages already present are not reinstalled.
set -eu
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs system packages)" >&2
    exit 1
fi

PYTHON=${PYTHON:-python3}
packages="fuse3 libfuse3-dev pkg-config gcc util-linux passwd openssh-client"
# Users other than root run rofs too (docs/unprivileged.md).  If the interpreter the venv
# is made from is out of their reach (a pyenv under /root), they get Debian's python3
# with pyfuse3 and trio, run as `python3 -m rofs` (tests/test_unprivileged.py does).
interpreter=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))' \
              2>/dev/null || true)
if [ -n "$interpreter" ] && ! setpriv --reuid=65534 --regid=65534 --clear-groups \
        env -i "$interpreter" -c pass 2>/dev/null; then
    packages="$packages python3-pyfuse3 python3-trio"
fi
need=""
for pkg in $packages; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need="$need $pkg"
done
command -v "$PYTHON" >/dev/null 2>&1 || need="$need python3"
if ! "$PYTHON" -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    need="$need python3-dev python3-venv"
fi
if [ -n "$need" ]; then
    echo "setup.sh: installing$need"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[test,bench]'
# The command where systemd units and mount(8) helpers look for it, and the unit where
# systemd looks for locally installed ones (enabling it is the admin's decision).
ln -sf "$(pwd)/.venv/bin/rofs" /usr/local/bin/rofs
install -D -m 644 rofs/systemd/rofs@.service /usr/local/lib/systemd/system/rofs@.service
echo "setup.sh: ready: $(.venv/bin/rofs --version) in $(pwd)/.venv"
