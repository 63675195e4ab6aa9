"""`rofs attic`: list the saved changes rofs moved aside, put them back (through the
daemon of a live mount, else under the upper layer's lock), or drop a set
(docs/policy.md, docs/image-updates.md)."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from rofs.commands.common import command_parser, state_operands, take_state
from rofs.daemon import control
from rofs.store import attic
from rofs.store.quoting import quote
from rofs.store.registry import ToolError, mounts


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "attic", "Saved changes that rofs moved aside instead of deleting them: when a new "
        "policy makes scratch a path whose changes the state dir holds, the mount moves "
        "them to STATEDIR/.rofs/attic/ and says so.  Without an action, list the sets "
        "(ID, mount, when, why, paths).  --restore puts a set's entries (or only the "
        "PATHs named) back, through the daemon on a live mount; --drop deletes a set.",
        "examples:\n  rofs attic /var/lib/stateless/state\n"
        "  rofs attic --restore 20261128T050000Z /var/lib/stateless/state\n"
        "  rofs attic --restore 20261128T050000Z /var/lib/stateless/state /etc/passwd\n"
        "  rofs attic --drop 20261128T050000Z --state /var/lib/stateless/state")
    state_operands(parser, "STATEDIR [PATH ...]", "; for --restore, only these paths of "
                   "the set, as the mount shows them")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--restore", metavar="ID",
                        help="put the entries of set ID back into the upper layer")
    action.add_argument("--drop", metavar="ID", help="delete set ID for good")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = take_state(parser, args, args.operands, 1 << 30)
    mounts(args.state)  # a clear error for what is not a state dir
    if paths and not args.restore:
        parser.error("PATHs go with --restore")
    if args.restore:
        done, errors = restore(args.state, args.restore, paths)
        for line in done:
            print(line)
        for line in errors:
            print("rofs attic: %s" % line, file=sys.stderr)
        return 1 if errors else 0
    if args.drop:
        print("\n".join(attic.drop(args.state, args.drop)))
        return 0
    sys.stdout.write(attic.format_sets(attic.sets(args.state)))
    return 0


def restore(state: str, set_id: str, wanted: list[str]) -> tuple[list[str], list[str]]:
    """Put a set's entries (or those named in `wanted`, as the mount shows them) back
    into the upper layer.  Returns (lines for what was restored, errors)."""
    done, errors = [], []
    chosen = attic.select(state, set_id)
    by_mount = {quote(m.mountpoint): m for m in mounts(state)}
    known = {p for s in chosen for p in s.present}
    for path in wanted:
        if path not in known:
            raise ToolError("%s is not in attic set %s (see `rofs attic`)"
                            % (path, set_id))
    for s in chosen:
        mount = by_mount.get(s.mountpoint)
        if mount is None:
            raise ToolError("%s: no recorded mount %s in %s" % (s.id, s.mountpoint, state))
        for shown in s.present:
            if wanted and shown not in wanted:
                continue
            try:
                if mount.live is not None:
                    restore_live(mount, s, shown)
                else:
                    attic.restore_offline(mount, s, shown)
            except (OSError, ToolError) as e:
                errors.append("%s: %s" % (shown, why(e)))
                continue
            done.append("restored %s" % shown)
        attic.drop_if_empty(s)
    return done, errors


def why(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno == errno.EEXIST:
        return ("it has changes of its own since it was set aside: keep them, or drop "
                "them with `rofs revert` and restore again")
    if isinstance(e, OSError) and e.errno == errno.EXDEV:
        return ("the live mount's policy makes it scratch: change the policy and mount "
                "again, then restore")
    if isinstance(e, OSError) and e.errno == errno.ENOENT:
        return "its parent directory no longer exists"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def restore_live(mount, s: attic.AtticSet, shown: str) -> None:
    try:
        control.request(mount.live.socket, {
            "op": "restore", "path": [os.fsdecode(c) for c in s.relative(shown)],
            "source": os.fsdecode(s.source(shown))})
    except control.ControlError as e:
        if e.errno is not None:
            raise OSError(e.errno, str(e)) from None
        raise ToolError(str(e)) from None
