"""`rofs status`: the live rofs mounts and what each daemon says of itself (docs/state-tools.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rofs.commands.common import (
    command_parser,
)
from rofs.daemon import control
from rofs.store.quoting import count, quote
from rofs.store.registry import (
    dead_mount,
    is_rofs_mount,
    mount_owners,
    rofs_mount_containing,
    rofs_mounts,
    runtime_path,
    unmount_command,
)


def status(mountpoints: list[str]) -> list[dict]:
    """What each live rofs mount says of itself (all of them when none is named):
    {"mountpoint", "ok", ...}; "ok" False with an "error" for a dead or silent one."""
    names = [os.path.realpath(m) for m in mountpoints] or sorted(rofs_mounts())
    owners = mount_owners()
    out = []
    for mnt in names:
        entry: dict = {"mountpoint": mnt, "ok": False}
        out.append(entry)
        if not is_rofs_mount(mnt):
            outer = rofs_mount_containing(mnt)
            if outer is not None:  # a path inside a mount: that mount's status
                entry.update(mountpoint=outer, asked=mnt)
                mnt = outer
        if dead_mount(mnt):
            entry["error"] = ("dead: the daemon is gone; run `%s` and mount again"
                              % unmount_command(mnt))
            continue
        if not is_rofs_mount(mnt):
            entry["error"] = "not a rofs mount"
            continue
        owner = owners.get(mnt, os.geteuid())
        if owner != os.geteuid():
            # Another user's mount (a user's own, or root's seen by a user): its daemon
            # is alive, which is all this caller may rely on.  Root does not ask it
            # either: what a user's daemon answers would be that user's words in root's
            # terminal.
            entry.update(ok=True, owner=owner)
            continue
        socket_path = runtime_path(mnt, ".sock")
        if socket_path is None:
            entry["error"] = "no runtime dir to reach the daemon ($XDG_RUNTIME_DIR)"
            continue
        try:
            reply = control.request(socket_path, {"op": "status"}, timeout=10)
        except control.ControlError as e:
            entry["error"] = str(e)
            continue
        reply.pop("ok", None)
        entry.update(reply, ok=True)
    return out


def format_status(entries: list[dict], now: float) -> str:
    if not entries:
        return "no rofs mounts\n"
    lines = []
    for e in entries:
        if e.get("asked"):
            lines.append("%s is inside the rofs mount %s:" % (quote(e["asked"]),
                                                             quote(e["mountpoint"])))
        if not e["ok"]:
            lines.append("%s: %s" % (quote(e["mountpoint"]), e["error"]))
            continue
        if "owner" in e:
            lines.append("%s: live, mounted by uid %d (`rofs status` as that user says "
                         "more)" % (quote(e["mountpoint"]), e["owner"]))
            continue
        up = int(now - e["started"])
        lines.append("%s: live, pid %d, up %dd %02d:%02d:%02d%s" % (
            quote(e["mountpoint"]), e["pid"], up // 86400, up // 3600 % 24, up // 60 % 60,
            up % 60, ", rofs %s" % e["version"] if e.get("version") else ""))
        if e.get("replaced"):
            lines.append("  server   replaced %s (the last one: %s); keeper pid %d"
                         % (count(e["replaced"], "time"), e.get("last_replaced"),
                            e.get("keeper", 0)))
        lines.append("  state    %s (upper %s, %s markers)" % (
            quote(e["state"]), quote(e["upper"]), e["markers"]))
        lines.append("  lower    %s" % quote(e["lower"]))
        rules = ", ".join("%d %s" % (n, c) for c, n in sorted(e["rules"].items()))
        lines.append("  policy   default %s%s" % (e["default_class"],
                                                  "; rules: " + rules if rules else ""))
        if e["scratch"]:
            lines.append("  scratch  %s" % quote(e["scratch"]))
        attic = e.get("attic") or {}
        if attic.get("sets"):
            lines.append("  attic    %s: %s moved aside in %s (newest %s): `rofs attic %s`"
                         % (quote(attic["dir"]), count(attic["paths"], "saved change"),
                            count(attic["sets"], "set"), attic["newest"],
                            quote(e["state"])))
        reconciled = e.get("reconciled")
        if reconciled:
            counts = reconciled["counts"]
            lines.append("  image    changed; reconciled at this mount: %s%s" % (
                ", ".join("%d %s" % (n, a) for a, n in sorted(counts.items())) or
                "nothing to do", " (replaced versions in attic set %s)"
                % reconciled["attic"] if reconciled.get("attic") else ""))
            if counts.get("conflict") or counts.get("hidden"):
                lines.append("  WARNING  the reconcile left conflicts or hidden entries: "
                             "`rofs report %s` lists them" % quote(e["state"]))
        elif e.get("image_changed"):
            lines.append("  image    changed and not reconciled (on-image-change %s): "
                         "`rofs diff %s` tells stale copies and conflicts, `rofs reconcile` "
                         "merges them (unmounted)" % (e.get("on_image_change", "?"),
                                                      quote(e["state"])))
        if e.get("bases_dropped"):
            lines.append("  WARNING  %s of copy-ups not kept in the base store (copy-ups "
                         "came faster than they were written): an image update will call "
                         "those files conflicts instead of merging them"
                         % count(e["bases_dropped"], "text"))
        moved = e.get("moved_at_mount")
        if moved:
            lines.append("  WARNING  this mount moved %s the policy makes scratch into %s"
                         % (count(moved["count"], "saved change"), quote(moved["set"])))
        lines.append("  log      %s" % ("%s (%d events written, %d dropped)" % (
            quote(e["log"]), e["log_written"], e["log_dropped"]) if e["log"] else "off"))
        lines.append("  now      %d nodes, %d open files, %d open directories, %d copy-ups "
                     "running, %d internal errors" % (e["nodes"], e["open_files"],
                                                      e["open_dirs"], e["copy_ups"],
                                                      e["internal_errors"]))
        collector = e.get("collector")
        if collector:
            lines.append("  memory   %d objects out of the collector's scans; %s, the "
                         "longest %.1f ms" % (collector["objects_out_of_scans"],
                                              count(collector["full_collections"],
                                                    "full collection"),
                                              collector["longest_full_collection_ms"]))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "status", "What each live rofs mount says of itself: its daemon, state dir, "
        "layers, policy, write log, and what it holds now (nodes, open files, copy-ups "
        "running, internal errors).  A mount whose daemon is gone shows as dead.  Exit "
        "status 0: every mount is live and has had no internal error; 1 otherwise (for "
        "monitoring).",
        "examples:\n  rofs status\n  rofs status --json /etc")
    parser.add_argument("mountpoints", metavar="MOUNTPOINT", nargs="*",
                        help="only these mounts (default: every rofs mount)")
    parser.add_argument("--json", action="store_true", help="the status as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    entries = status(args.mountpoints)
    sys.stdout.write(json.dumps(entries, indent=1) + "\n" if args.json
                     else format_status(entries, time.time()))
    return 0 if all(e["ok"] and not e.get("internal_errors") for e in entries) else 1
