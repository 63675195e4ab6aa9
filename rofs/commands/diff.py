"""`rofs diff`: what changed in a state dir against its lower layer (docs/state-tools.md).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from rofs._sys import proc_path
from rofs.commands.common import (
    command_parser,
    ignore_options,
    state_operands,
    take_state,
)
from rofs.commands.patterns import patterns_of
from rofs.store.differ import Change, Differ, text_lines
from rofs.store.layers import (
    open_below,
    open_listable,
)
from rofs.store.quoting import count, quote, top_dir, unquote
from rofs.store.registry import (
    mount_for,
    mounts,
    use_lower,
)


def patch(differ: Differ, change: Change) -> str:
    """A unified diff of a text file's change (empty when there is none to show)."""
    if change.kind != "file" or change.status not in ("A", "M", "D"):
        return ""
    if change.status == "M" and "content" not in change.what:
        return ""
    mount = differ.mount
    rel = unquote(change.path[len(quote(mount.mountpoint).rstrip("/")) + 1:])
    comps = tuple(rel.split(b"/"))
    root = open_listable(None, os.fsencode(mount.upper))
    try:
        parent = differ.parent_lower(root, comps)
        lower = differ.lower_path(parent + (comps[-1],)) if parent is not None else None
        old = text_lines(lower if change.status != "A" else None)
        if change.status == "D":
            new = text_lines(None)
        else:
            upper_dir = open_below(root, comps[:-1])
            try:
                new = text_lines(proc_path(upper_dir, comps[-1]))
            finally:
                os.close(upper_dir)
    finally:
        os.close(root)
    if old is None or new is None:
        return "Binary file %s differs\n" % change.path
    return "".join(difflib.unified_diff(old, new, "a" + change.path, "b" + change.path))


def diff(state: str, path: str | None, *, as_json: bool = False,
         with_patch: bool = False, lower: str | None = None, ignore=None,
         summary: bool = False) -> str:
    """The changes of a state dir.  `lower`: compare with this directory instead of the
    lower layer the mount recorded (a copied state dir, next to the image it is for).
    `ignore`: a rofs.commands.patterns.Patterns of paths to leave out; `summary`: counts per top
    directory and status instead of the changes."""
    if path is None:
        selected = [(m, ()) for m in mounts(state)]
    else:
        selected = [mount_for(state, path)]
    if lower is not None:
        use_lower([m for m, _ in selected], lower, "name a PATH to say which one")
    out, records = [], []
    tops: dict[str, dict[str, int]] = {}
    left_out = 0
    for mount, rel in selected:
        differ = Differ(mount)
        base = quote(mount.mountpoint).rstrip("/")
        for change in differ.run(rel):
            if ignore is not None and ignore.match(change.path):
                left_out += 1
                continue
            counts = tops.setdefault(top_dir(base, change.path), {})
            counts[change.status] = counts.get(change.status, 0) + 1
            records.append({"path": change.path, "status": change.status,
                            "kind": change.kind, "what": change.what,
                            "renamed_from": change.renamed_from,
                            "image": change.image or None})
            out.append(change.line() + "\n")
            if with_patch:
                out.append(patch(differ, change))
    if summary:
        return _diff_summary(tops, len(records), left_out, as_json)
    if as_json:
        return json.dumps(records, indent=1) + "\n"
    return "".join(out)


def _diff_summary(tops: dict[str, dict[str, int]], total: int, left_out: int,
                  as_json: bool) -> str:
    if as_json:
        return json.dumps({"changes": total, "ignored": left_out, "directories": tops},
                          indent=1) + "\n"
    lines = ["%s (A added, M modified, D deleted, R replaced)%s"
             % (count(total, "change"), ", %d left out by --ignore" % left_out
                if left_out else "")]
    lines.append("  %6s %6s %6s %6s  %s" % ("A", "M", "D", "R", "directory"))
    for top, c in sorted(tops.items(), key=lambda item: (-sum(item[1].values()), item[0])):
        lines.append("  %6d %6d %6d %6d  %s" % (c.get("A", 0), c.get("M", 0), c.get("D", 0),
                                                 c.get("R", 0), top))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "diff", "What the state dir changed against the lower layer, mounted or not: "
        "A added, M modified (saying what: content, mode, owner, mtime, xattrs, target), "
        "D deleted, R replaced (another type, or an opaque directory hiding the lower "
        "one); a renamed directory is an A with \"renamed from\" and a D.",
        "examples:\n  rofs diff /var/lib/stateless/state\n"
        "  rofs diff --patch /var/lib/stateless/state /etc/ssh")
    state_operands(parser, "STATEDIR [PATH]", ", and optionally only this path (and "
                   "below), as the mount shows it")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--patch", action="store_true",
                     help="also a unified diff of each changed text file")
    out.add_argument("--json", action="store_true", help="the changes as JSON")
    parser.add_argument("--lower", metavar="DIR",
                        help="compare with DIR instead of the lower directory the mount "
                        "recorded (a copy of a state dir, next to the image's directory)")
    ignore_options(parser)
    parser.add_argument("--summary", action="store_true",
                        help="only counts per top directory and status")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    path = (take_state(parser, args, args.operands, 1) or [None])[0]
    ignore = patterns_of(args, exceptions=False) if args.ignore or args.ignore_file else None
    sys.stdout.write(diff(args.state, path, as_json=args.json, with_patch=args.patch,
                          lower=args.lower, ignore=ignore, summary=args.summary))
    return 0
