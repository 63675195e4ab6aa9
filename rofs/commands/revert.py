"""`rofs revert`: drop the change at a path, through the live daemon (which keeps the
kernel's caches true) or, unmounted, under the upper layer's lock (docs/state-tools.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from rofs.commands.common import (
    command_parser,
)
from rofs.daemon import control
from rofs.store import index
from rofs.store.layers import (
    UpperLayer,
    open_listable,
)
from rofs.store.quoting import quote
from rofs.store.registry import (
    Mount,
    ToolError,
    locked_upper,
    mount_for,
    rofs_mount_containing,
    runtime_path,
)


def revert(paths: list[str], state: str | None) -> tuple[list[str], list[str]]:
    """Revert each path; returns a line per path saying what happened, and the errors
    (a path that is nowhere is one: a typo must not look like success)."""
    out, errors = [], []
    for path in paths:
        try:
            out.append(_revert_one(path, state))
        except NoSuchPath as e:
            errors.append(str(e))
    return out, errors


class NoSuchPath(ToolError):
    """A path that is in neither layer (the other paths are still done; exit code 1)."""


NOWHERE = "no such file or directory in the lower layer or the state"


def _revert_one(path: str, state: str | None) -> str:
    shown = os.path.normpath(os.path.abspath(path))
    if state is not None:
        mount, rel = mount_for(state, path)
        live_socket = mount.live.socket if mount.live is not None else None
    else:
        mnt = rofs_mount_containing(path)
        if mnt is None:
            raise ToolError("%s is not on a live rofs mount; name its state dir with "
                            "--state" % quote(shown))
        rel = tuple(os.fsencode(c) for c in shown[len(mnt.rstrip("/")) + 1:].split("/")
                    if c)
        live_socket = runtime_path(mnt, ".sock")
        if live_socket is None:
            raise ToolError("cannot reach the daemon of %s ($XDG_RUNTIME_DIR is not "
                            "set): unmount it and use --state" % mnt)
        mount = None
    if not rel:
        raise ToolError("%s is a mount's root: name paths below it" % quote(shown))
    if live_socket is not None:
        try:
            reply = control.request(live_socket, {"op": "revert",
                                                  "path": [os.fsdecode(c) for c in rel]})
        except control.ControlError as e:
            if e.errno == errno.ENOENT:
                raise NoSuchPath("%s: %s" % (quote(shown), NOWHERE)) from None
            raise ToolError("%s: %s" % (quote(shown), e)) from None
        done = reply["reverted"]
    else:
        done = revert_offline(mount, rel)
        if not done and not os.path.lexists(os.path.join(
                mount.lower_root(), *map(os.fsdecode, rel))):
            raise NoSuchPath("%s: %s" % (quote(shown), NOWHERE))
    return "%s %s" % ("reverted" if done else "unchanged", quote(shown))


def revert_offline(mount: Mount, rel: tuple[bytes, ...]) -> bool:
    """Drop the upper entry at `rel` of an unmounted mount; whether there was one."""
    if not rel:
        raise ToolError("cannot revert the mount's root; name a path below it")
    lock = locked_upper(mount)
    try:
        parent = open_listable(None, os.fsencode(
            os.path.join(mount.upper, *map(os.fsdecode, rel[:-1]))))
    except FileNotFoundError:
        os.close(lock)
        return False
    except OSError as e:
        os.close(lock)
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return False
        raise
    work = os.open(mount.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    index_fd = os.open(mount.index, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) \
        if os.path.isdir(mount.index) else None
    try:
        upper = UpperLayer(parent, work, mount.markers)
        upper.index_fd = index_fd
        if upper.try_stat(parent, rel[-1]) is None:
            return False
        index.detach(upper, parent, rel[-1])
        return True
    finally:
        for fd in (parent, work, lock) + ((index_fd,) if index_fd is not None else ()):
            os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "revert", "Drop the changes at each PATH (a whole tree for a directory), so the "
        "lower layer shows through again.  On a live mount the daemon does it and the "
        "kernel's caches follow; otherwise name the state dir with --state.",
        "examples:\n  rofs revert /etc/hosts /etc/ssh\n"
        "  rofs revert --state /var/lib/stateless/state /etc/hosts   (not mounted)")
    parser.add_argument("paths", metavar="PATH", nargs="+",
                        help="path as the mount shows it (e.g. /etc/hosts)")
    parser.add_argument("--state", metavar="STATEDIR",
                        help="the state dir (needed when the mount is not live)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    done, errors = revert(args.paths, args.state)
    for line in done:
        print(line)
    for line in errors:
        print("rofs revert: error: %s" % line, file=sys.stderr)
    return 1 if errors else 0
