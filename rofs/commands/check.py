"""`rofs check`: find, and with --repair mend, what a crash or a hand edit left in a state
dir (docs/state-tools.md).
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass

from rofs._sys import proc_path
from rofs.commands.common import (
    command_parser,
    state_operands,
    take_state,
)
from rofs.store.differ import kind_of, read_xattr
from rofs.store.layers import (
    SKIP,
    Markers,
    is_whiteout,
    open_below,
    open_listable,
    remove_path,
    walk_sorted,
)
from rofs.store.quoting import quote
from rofs.store.registry import (
    Mount,
    locked_upper,
    mounts,
    use_lower,
)


@dataclass
class Problem:
    where: str
    what: str
    repair: object = None  # callable, or None when only a human can decide

    def line(self) -> str:
        return "%s: %s" % (self.where, self.what)


def check(state: str, repair: bool = False,
          lower: str | None = None) -> tuple[list[Problem], list[str]]:
    """Problems in every mount of a state dir; with `repair`, fixed where safe.
    `lower`: as for diff (a state dir of one mount only)."""
    problems: list[Problem] = []
    notes: list[str] = []
    selected = mounts(state)
    if lower is not None:
        use_lower(selected, lower, "check them one by one; cannot tell which one")
    for mount in selected:
        lock = locked_upper(mount) if repair else None
        try:
            found = _check_mount(mount, mount.markers)
            problems += found
            if repair:
                for p in found:
                    if p.repair is not None:
                        p.repair()
                        notes.append("repaired: " + p.line())
        finally:
            if lock is not None:
                os.close(lock)
    return problems, notes


def _check_mount(mount: Mount, markers: Markers) -> list[Problem]:
    problems: list[Problem] = []
    work = mount.work
    if os.path.isdir(work):
        for name in sorted(os.listdir(work)):
            if name.startswith("#rofs."):
                path = os.path.join(work, name)
                problems.append(Problem(quote(path), "left over by an interrupted operation",
                                        lambda p=path: remove_path(p)))
    differ_lower = mount.lower_root()
    upper = os.fsencode(mount.upper)

    def lower_has(rel_lower) -> bool:
        if rel_lower is None:
            return False
        return os.path.lexists(os.path.join(differ_lower, *map(os.fsdecode, rel_lower)))

    def at(rel, action):
        """A repair of the upper entry at rel: found again when it runs (the walk's
        descriptors are closed by then)."""
        def repair() -> None:
            top = open_listable(None, upper)
            try:
                parent = open_below(top, rel[:-1])
            finally:
                os.close(top)
            try:
                action(proc_path(parent, rel[-1]))
            finally:
                os.close(parent)
        return repair

    def visit(dir_fd: int, name: bytes, crel, lower_dir):
        child = proc_path(dir_fd, name)
        st = os.lstat(child)
        shown = quote(upper + b"/" + b"/".join(crel))
        counterpart = None if lower_dir is None else lower_dir + (name,)
        opaque = read_xattr(child, markers.opaque)
        redirect = read_xattr(child, markers.redirect)
        ino = read_xattr(child, markers.ino)
        if ino is not None and not (ino.split() and ino.split()[0].isdigit()):
            problems.append(Problem(shown, "malformed %s marker %r" % (markers.ino.decode(),
                                                                       ino),
                                    at(crel, lambda c: os.removexattr(
                                        c, markers.ino, follow_symlinks=False))))
        if not stat.S_ISDIR(st.st_mode):
            for marker, value in ((markers.opaque, opaque), (markers.redirect, redirect)):
                if value is not None:
                    problems.append(Problem(shown, "%s on a %s (only directories carry it)"
                                            % (marker.decode(), kind_of(st.st_mode)),
                                            at(crel, lambda c, m=marker: os.removexattr(
                                                c, m, follow_symlinks=False))))
            if is_whiteout(st) and not lower_has(counterpart):
                problems.append(Problem(shown, "whiteout over nothing (the lower has no "
                                        "such entry)", at(crel, os.unlink)))
            return SKIP
        if opaque not in (None, b"y"):
            problems.append(Problem(shown, "opaque marker with value %r" % opaque,
                                    at(crel, lambda c: os.setxattr(
                                        c, markers.opaque, b"y", follow_symlinks=False))))
        if redirect is not None:
            target = tuple(c for c in redirect.split(b"/") if c) \
                if redirect.startswith(b"/") else \
                (None if lower_dir is None else lower_dir + (redirect,))
            if target is None or not os.path.isdir(
                    os.path.join(differ_lower, *map(os.fsdecode, target))):
                problems.append(Problem(shown, "redirect to %r, which the lower does not "
                                        "have" % redirect))
            return target
        return None if opaque == b"y" else counterpart

    # Iterative, with bounded descriptors: a user may have made the tree any depth.
    root_fd = open_listable(None, upper)
    try:
        walk_sorted(root_fd, (), (), visit)
    finally:
        os.close(root_fd)
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "check", "Find what a crash or a hand edit can leave in a state dir: leftover "
        "work files, markers on the wrong kind of object or with wrong values, whiteouts "
        "over nothing, redirects to nowhere.  Exit status 0: clean (or repaired), 1: "
        "problems found.",
        "example:\n  rofs check --repair /var/lib/stateless/state")
    state_operands(parser, "STATEDIR")
    parser.add_argument("--repair", action="store_true",
                        help="fix what can be fixed safely (the mount must not be live)")
    parser.add_argument("--lower", metavar="DIR",
                        help="the lower directory is DIR, not the one the mount recorded "
                        "(a copied state dir; whiteouts are judged against it)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    take_state(parser, args, args.operands, 0)
    problems, notes = check(args.state, repair=args.repair, lower=args.lower)
    for p in problems:
        print(p.line() + ("" if p.repair or not args.repair else
                          "  (not repaired: decide by hand)"))
    for note in notes:
        print(note)
    left = [p for p in problems if not (args.repair and p.repair)]
    return 1 if left else 0
