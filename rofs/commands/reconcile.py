"""`rofs reconcile`: a state dir with a new image, by hand (docs/image-updates.md); the
work is rofs.store.reconcile's, which a mount runs too (--on-image-change)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from rofs.commands.common import (
    command_parser,
    state_operands,
    take_state,
)
from rofs.store import origin, reconcile
from rofs.store.quoting import count, quote
from rofs.store.reconcile import Result
from rofs.store.registry import ToolError, locked_upper, mount_for, mounts, record_mount, use_lower


def reconcile_state(state: str, path: str | None, *, lower: str | None = None,
                    dry_run: bool = False, unhide: bool = False) -> list[Result]:
    """`rofs reconcile`: every mount of a state dir (or the one holding `path`), which
    must be unmounted unless `dry_run`."""
    selected = [(m, ()) for m in mounts(state)] if path is None else [mount_for(state, path)]
    if lower is not None:
        use_lower([m for m, _ in selected], lower, "name a PATH to say which one")
    results = []
    for mount, rel in selected:
        if mount.live is not None and not dry_run:
            raise ToolError("%s is mounted (at %s): unmount it to reconcile, or let its "
                            "next mount do it (--on-image-change reconcile, the default); "
                            "--dry-run shows what it would do"
                            % (state, quote(mount.mountpoint)))
        lock = None if dry_run else locked_upper(mount)
        try:
            r = reconcile.Reconciler(mount, dry_run=dry_run, unhide=unhide)
            try:
                results.append(r.run(rel))
            finally:
                r.close()
        finally:
            if lock is not None:
                os.close(lock)
        if not dry_run:
            reconcile.log_actions(mount, results[-1])
            if lower is None and not rel:
                # Reconciled with the lower its mount records: the next mount has
                # nothing left to reconcile.
                fingerprint = origin.fingerprint(mount.lower)
                if fingerprint is not None:
                    record_mount(mount.state, mount.mountpoint, mount.lower, mount.overlay,
                                 fingerprint)
    return results


def render(results: list[Result], as_json: bool) -> str:
    if as_json:
        return json.dumps([{"mountpoint": r.mountpoint, "dry_run": r.dry_run,
                            "attic": os.path.basename(r.attic) if r.attic else None,
                            "counts": r.counts(),
                            "actions": [a.as_dict() for a in r.actions]}
                           for r in results], indent=1) + "\n"
    lines = []
    for r in results:
        lines += [a.line() for a in r.actions]
        lines.append(r.summary())
    conflicts = sum(r.counts().get("conflict", 0) for r in results)
    if conflicts:
        lines.append("%s: resolve each by hand (its NAME.rofs-new is the image's "
                     "version), then remove NAME.rofs-new" % count(conflicts, "conflict"))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "reconcile", "Reconcile the state dir with the lower layer after an image "
        "update (what a mount does itself, unless --on-image-change says otherwise): a "
        "copy unchanged since its copy-up goes, so the image's new version shows; a copy "
        "changed here only in its metadata gets the image's content with that metadata; "
        "passwd, group, shadow, gshadow, subuid and subgid are merged per entry and other "
        "text files line by line; what cannot be merged keeps this host's version and "
        "gets the image's beside it as NAME.rofs-new.  What it replaces goes to the "
        "attic (`rofs attic`), every action to the write log (`rofs report`).  The "
        "state must not be mounted, but for --dry-run.  Exit status 0: no conflict, 1: "
        "conflicts or hidden entries to look at.",
        "examples:\n  rofs reconcile --dry-run /var/lib/stateless/state\n"
        "  rofs reconcile /var/lib/stateless/state\n"
        "  rofs reconcile --lower /mnt/image-v2/etc /srv/hosts/web1/state")
    state_operands(parser, "STATEDIR [PATH]", ", and optionally only this path (and "
                   "below), as the mount shows it")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what it would do, change nothing (also while mounted)")
    parser.add_argument("--unhide", action="store_true",
                        help="copy the entries the image added under a directory replaced "
                        "here (an opaque directory) into it, instead of only reporting them")
    parser.add_argument("--lower", metavar="DIR",
                        help="the new image's directory, instead of the lower directory "
                        "the mount recorded")
    parser.add_argument("--json", action="store_true", help="the actions as JSON")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    path = (take_state(parser, args, args.operands, 1) or [None])[0]
    results = reconcile_state(args.state, path, lower=args.lower, dry_run=args.dry_run,
                              unhide=args.unhide)
    sys.stdout.write(render(results, args.json))
    return 1 if any(a.action in ("conflict", "hidden") for r in results
                    for a in r.actions) else 0
