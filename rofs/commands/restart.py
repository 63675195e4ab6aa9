"""`rofs restart MOUNTPOINT`: replace a live mount's daemon with the rofs installed now,
without unmounting (rofs/daemon/handover.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from rofs.commands.common import EXIT_USAGE, command_parser
from rofs.commands.status import status
from rofs.store.quoting import quote


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "restart", "Replace the daemon of a live mount with the rofs installed now (an "
        "upgrade) without unmounting: the server stops taking requests, writes out what "
        "it queued, and a new keeper running the code on disk takes the mount over as "
        "after a crash; callers see a pause.  The mount keeps the policy it was mounted "
        "with (a changed policy file applies at the next mount).  If the new code cannot "
        "start, the old daemon goes on serving and this says so.",
        "example:\n  rofs restart /etc")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the new daemon (default 60)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    (entry,) = status([args.mountpoint])
    if not entry["ok"] or "keeper" not in entry:
        print("rofs restart: %s: %s" % (quote(args.mountpoint), entry.get(
            "error", "not a live rofs mount of this user's")), file=sys.stderr)
        return EXIT_USAGE
    keeper, before = entry["keeper"], entry.get("replaced", 0)
    failed = entry.get("restarts_failed", 0)
    os.kill(keeper, signal.SIGUSR1)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        (now,) = status([entry["mountpoint"]])
        if now["ok"] and now.get("restarts_failed", 0) > failed:
            print("rofs restart: %s: the new rofs did not start; the old one serves on "
                  "(its log says why)" % quote(entry["mountpoint"]), file=sys.stderr)
            return 1
        if now["ok"] and now.get("replaced", 0) > before:
            print("%s: served by pid %d (keeper %d), was pid %d" % (
                quote(entry["mountpoint"]), now["pid"], now["keeper"], entry["pid"]))
            return 0
    print("rofs restart: %s: no new server within %g s" % (quote(entry["mountpoint"]),
                                                          args.timeout), file=sys.stderr)
    return 1
