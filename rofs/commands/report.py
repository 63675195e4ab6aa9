"""`rofs report`: who wrote where, from one or many write logs (docs/write-log.md).

The report starts with a summary (changes per program, per top directory), then groups
the changes by program (the script an interpreter ran, else its executable, else its
command name): the paths it changed, how often and with which operations, first and
last time, and the changes the read-only class refused.  Logs of several hosts merge
into one report.  Paths matching the exceptions list (rolo's idea: /tmp and the like)
or an --ignore pattern are left out.

`--suggest` replays the changes in time order and prints the policy that keeps what the
workload changed for good, and nothing it only used for a while (a temporary file
renamed over another, a lock created and removed): a rofs policy file whose `default`
is scratch, with the Fedora statetab/rwtab equivalents as comments.  A directory in
which the workload created files that stayed (a spool, a cron.d, a git repository's
objects) is kept whole, so the files the same programs create there next time are kept
too; a version-control directory (.git, ...) is kept whole wherever it changed.

Every name in the input and the output is in the escaped form of rofs.store.quoting, so that a
name is one field on one line and a suggested policy parses back as it was meant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from rofs.commands.common import ignore_options, state_option
from rofs.commands.patterns import DEFAULT_EXCEPTIONS, Patterns, patterns_of
from rofs.store.quoting import count, quote, top_dir
from rofs.store.writelog import CUTS, log_files, read_cuts, script_of

CREATES = {"create", "mknod", "mkdir", "symlink", "link"}
REMOVES = {"unlink", "rmdir"}
# Directories that one program keeps changing as a whole: kept whole by --suggest.
REPOSITORIES = {".git", ".hg", ".svn", ".bzr", "_darcs"}


class ReportError(Exception):
    pass


def excepted(event: dict, key: str, patterns: Patterns) -> bool:
    return patterns.leaves_out(event.get(key), event.get("mount") or "")


def _version(event: dict) -> int:
    v = event.get("v")
    return v if isinstance(v, int) else 1


def normalize(event: dict) -> dict:
    """A log line written before names were escaped (no "v": their text was decoded
    with surrogateescape), in today's form."""
    if _version(event) >= 2:
        return event
    for key in ("path", "path2", "rule", "mount", "exe", "comm", "host"):
        if isinstance(event.get(key), str):
            event[key] = quote(event[key])
    cmd = event.get("cmd")
    if isinstance(cmd, list):
        raw = [os.fsencode(a) for a in cmd if isinstance(a, str)]
        script = script_of(os.fsencode(event.get("exe") or ""), raw)
        event["script"] = quote(script) if script is not None else None
        event["cmd"] = [quote(a) for a in raw]
    return event


PROCESS_FIELDS = ("exe", "cmd", "script")  # in a process's record since log version 3


def load_events(sources: list[str]) -> tuple[list[dict], list[str], int]:
    """Events from every log under `sources` (files, log dirs or state dirs), in time
    order; also the files read and the number of lines that were not events."""
    files: list[str] = []
    for source in sources:
        try:
            files += log_files(source)
        except FileNotFoundError:
            raise ReportError("%s: no such log file or directory" % source) from None
    events, bad = [], 0
    for path in files:
        processes: dict[str, dict] = {}  # a file's process records, by key
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        bad += 1  # a line cut short by a crash, or not ours
                        continue
                    if not isinstance(event, dict) or "t" not in event:
                        bad += 1
                    elif "op" in event:
                        process = processes.get(event.get("proc"))
                        if process is not None:
                            for key in PROCESS_FIELDS:
                                event.setdefault(key, process.get(key))
                        events.append(normalize(event))
                    elif isinstance(event.get("proc"), str):
                        processes[event["proc"]] = event
                    else:
                        bad += 1
        except OSError as e:
            raise ReportError("cannot read %s: %s" % (path, e.strerror)) from None
    events.sort(key=lambda e: e["t"])
    return events, files, bad


def program_of(event: dict) -> str:
    """Who made a change: the script an interpreter ran, else the executable."""
    return event.get("script") or event.get("exe") or event.get("comm") or "?"


def name_of(event: dict) -> str:
    """The program's own name: the last component of its argv[0] (the kernel's comm is
    cut at 15 characters), else comm."""
    cmd = event.get("cmd")
    if event.get("script"):
        return event["script"].rsplit("/", 1)[-1]
    if isinstance(cmd, list) and cmd and cmd[0]:
        return cmd[0].rsplit("/", 1)[-1]
    return event.get("comm") or "?"


@dataclass
class PathStats:
    ops: Counter = field(default_factory=Counter)
    denied: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass
class ProgramStats:
    program: str
    names: set = field(default_factory=set)
    hosts: set = field(default_factory=set)
    changes: int = 0
    denied: int = 0
    failed: int = 0
    first: float = 0.0
    last: float = 0.0
    paths: dict = field(default_factory=dict)


@dataclass
class Summary:
    programs: list[ProgramStats]
    ignored: int  # events left out by the exceptions list and --ignore
    tops: dict[str, Counter]  # top directory -> {"changes": n, "refused": n}


def summarize(events: list[dict], patterns: Patterns) -> Summary:
    programs: dict[str, ProgramStats] = {}
    tops: dict[str, Counter] = {}
    ignored = 0
    for e in events:
        if excepted(e, "path", patterns):
            ignored += 1
            continue
        name = program_of(e)
        p = programs.get(name)
        if p is None:
            p = programs[name] = ProgramStats(name, first=e["t"])
        p.names.add(name_of(e))
        p.hosts.add(e.get("host") or "?")
        p.last = e["t"]
        result = e.get("result", "ok")
        if result == "EROFS":
            p.denied += 1
        elif result != "ok":
            p.failed += 1
        else:
            p.changes += 1
        if e.get("path") is not None and result in ("ok", "EROFS"):
            top = tops.setdefault(top_dir(e.get("mount") or "", e["path"]), Counter())
            top["changes" if result == "ok" else "refused"] += 1
        for key in ("path", "path2"):
            path = e.get(key)
            if path is None or (key == "path2" and e["op"] == "link"):
                continue  # a link's source is only read
            s = p.paths.get(path)
            if s is None:
                s = p.paths[path] = PathStats(first=e["t"])
            s.last = e["t"]
            op = e["op"] if key == "path" else e["op"] + " (target)"
            s.ops[op] += 1
            if result == "EROFS":
                s.denied += 1
    ordered = sorted(programs.values(), key=lambda p: (-(p.changes + p.denied), p.program))
    return Summary(ordered, ignored, tops)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(rows: list[tuple[int, int, str]]) -> list[str]:
    lines = ["  %7s %7s  %s" % ("changes", "refused", "")]
    lines += ["  %7d %7d  %s" % row for row in rows]
    lines[0] = lines[0].rstrip()
    return lines


def render(summary: Summary, files: list[str], bad: int, only_summary: bool = False) -> str:
    programs = summary.programs
    lines = []
    total = sum(p.changes for p in programs)
    denied = sum(p.denied for p in programs)
    hosts = set().union(*(p.hosts for p in programs)) if programs else set()
    lines.append("%s and %s by %s on %s, from %s" % (
        count(total, "change"), count(denied, "refused write"),
        count(len(programs), "program"), count(len(hosts), "host"),
        count(len(files), "log file")))
    if summary.ignored:
        lines.append("%s left out by the exceptions list and --ignore"
                     % count(summary.ignored, "event"))
    if bad:
        lines.append("1 log line was not an event (cut short?) and was skipped" if bad == 1
                     else "%d log lines were not events (cut short?) and were skipped" % bad)
    if programs:
        lines += ["", "By program:"]
        lines += _table([(p.changes, p.denied, "%s (%s)" % (p.program, ", ".join(
            sorted(p.names)))) for p in programs])
        lines += ["", "By directory:"]
        lines += _table([(c["changes"], c["refused"], top) for top, c in sorted(
            summary.tops.items(), key=lambda item: (-sum(item[1].values()), item[0]))])
    if only_summary:
        return "\n".join(lines) + "\n"
    for p in programs:
        lines.append("")
        extra = []
        if p.denied:
            extra.append("%d refused" % p.denied)
        if p.failed:
            extra.append("%d failed" % p.failed)
        lines.append("%s (%s): %s%s, %s .. %s, %s" % (
            p.program, ", ".join(sorted(p.names)), count(p.changes, "change"),
            " (%s)" % ", ".join(extra) if extra else "", _when(p.first), _when(p.last),
            "hosts " + ", ".join(sorted(p.hosts)) if len(p.hosts) > 1
            else "host " + next(iter(p.hosts))))
        for path, s in sorted(p.paths.items()):
            ops = ", ".join("%s x%d" % (op, n) if n > 1 else op
                            for op, n in sorted(s.ops.items()))
            lines.append("    %s  %s%s" % (path, ops, "  REFUSED x%d" % s.denied
                                            if s.denied else ""))
    return "\n".join(lines) + "\n"


def as_json(summary: Summary, files: list[str], bad: int) -> str:
    return json.dumps({
        "files": [quote(f) for f in files], "skipped_lines": bad, "ignored": summary.ignored,
        "directories": {top: {"changes": c["changes"], "refused": c["refused"]}
                        for top, c in sorted(summary.tops.items())},
        "programs": [{
            "program": p.program, "names": sorted(p.names), "hosts": sorted(p.hosts),
            "changes": p.changes, "refused": p.denied, "failed": p.failed,
            "first": p.first, "last": p.last,
            "paths": {path: {"ops": dict(s.ops), "refused": s.denied, "first": s.first,
                             "last": s.last} for path, s in sorted(p.paths.items())}}
            for p in summary.programs]}, indent=1) + "\n"


# ---------------------------------------------------------------- suggestions


@dataclass
class Fate:
    """What a workload did to one path, replayed in time order."""

    existed: bool | None = None  # before the workload (None: cannot tell)
    exists: bool = True
    changed: bool = False
    programs: set = field(default_factory=set)


def replay(events: list[dict], patterns: Patterns
           ) -> tuple[dict[str, Fate], dict[str, set], set[str]]:
    """Per path: its fate; the paths the read-only class refused (with programs); and
    the paths an explicit scratch rule covers (left scratch)."""
    fates: dict[str, Fate] = {}
    refused: dict[str, set] = {}
    explicit_scratch: set[str] = set()

    def fate(path: str, first_op: str) -> Fate:
        f = fates.get(path)
        if f is None:
            f = fates[path] = Fate(existed=first_op not in CREATES)
        return f

    for e in events:
        path, op = e.get("path"), e["op"]
        if path is None or excepted(e, "path", patterns):
            continue
        program = program_of(e)
        if e.get("result") == "EROFS":
            refused.setdefault(path, set()).add(program)
            continue
        if e.get("result", "ok") != "ok":
            continue
        if e.get("class") == "scratch" and e.get("rule"):
            explicit_scratch.add(path)
        if op in ("rename", "exchange"):
            src, dst = path, e.get("path2")
            if dst is None or excepted(e, "path2", patterns):
                continue
            s, d = fate(src, op), fates.get(dst)
            if d is None:
                # Since log version 2 a rename says when its destination was new.
                existed = not e.get("new", False) if _version(e) >= 2 else None
                d = fates[dst] = Fate(existed=existed)
            d.exists = d.changed = True
            d.programs.add(program)
            if op == "exchange":
                s.changed = True
            else:
                s.exists = False
                s.changed = bool(s.existed)
            s.programs.add(program)
            continue
        f = fate(path, op)
        f.programs.add(program)
        if op in CREATES:
            f.exists = f.changed = True
        elif op in REMOVES:
            f.exists = False
            f.changed = f.existed is not False
        else:
            f.changed = True
    return fates, refused, explicit_scratch


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _below(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def kept_whole(fates: dict[str, Fate], keep: list[str], mounts: set[str]
               ) -> dict[str, str]:
    """Directories to keep whole, and why: those in which files that stayed were
    created (a program makes new entries there: a spool, a cron.d, git's objects), and
    version-control directories that changed.  A mount's root is never one (keeping
    it whole is `default persistent`)."""
    whole: dict[str, str] = {}
    for path in keep:
        parts = path.split("/")
        for i, part in enumerate(parts):
            if part in REPOSITORIES:
                repo = "/".join(parts[:i + 1])
                if any(_below(repo, m) for m in mounts):
                    whole.setdefault(repo, "a %s repository" % part)
                break
    created_in: dict[str, set] = {}
    for path in keep:
        f = fates[path]
        if f.existed is False and f.exists and any(_below(_parent(path), m) for m in mounts):
            created_in.setdefault(_parent(path), set()).update(f.programs)
    for parent, programs in sorted(created_in.items()):
        whole.setdefault(parent, "new entries appeared in it (%s)"
                         % ", ".join(sorted(programs)))
    return whole


def suggest(events: list[dict], patterns: Patterns, files: list[str]) -> str:
    fates, refused, explicit_scratch = replay(events, patterns)
    mounts = {e.get("mount") or "/" for e in events}
    keep = sorted(p for p, f in fates.items() if f.changed and p not in explicit_scratch)
    whole = kept_whole(fates, keep, mounts)
    # A kept directory covers everything below it.
    covered: list[str] = []
    for path in sorted(set(keep) | set(whole)):
        if not any(_below(path, k) for k in covered):
            covered.append(path)
    transient = sorted(p for p, f in fates.items() if not f.changed)
    lines = ["# rofs policy suggested by `rofs report --suggest` from %s in %s."
             % (count(len(events), "event"), ", ".join(quote(f) for f in files) or
                "no log"),
             "# Changes to these paths are kept; everything else is wiped at the next "
             "mount.",
             "default scratch"]
    for path in covered:
        why = whole.get(path)
        lines.append("persistent %s%s" % (path, "   # whole: %s" % why if why else ""))
    if transient:
        lines.append("# Written but nothing to keep (temporary, or removed again): "
                     "scratch is enough.")
        lines += ["#   %s" % p for p in transient]
    if explicit_scratch:
        lines.append("# Written under paths already scratch by a rule: left scratch.")
        lines += ["#   %s" % p for p in sorted(explicit_scratch)]
    if refused:
        lines.append("# Refused by the read-only class (what they need is unknown: "
                     "give them a class and run the workload again):")
        lines += ["#   %s (%s)" % (p, ", ".join(sorted(progs)))
                  for p, progs in sorted(refused.items())]
    lines.append("# Fedora equivalent, statetab (persistent):")
    lines += ["#   %s" % p for p in covered]
    rwtab = [p for p in transient if fates[p].existed]
    if rwtab:
        lines.append("# and rwtab (scratch; only paths that existed before):")
        lines += ["#   files %s" % p for p in rwtab]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- image updates

RECONCILE = "reconcile"  # the op of what `rofs reconcile` (or a mount's) did to a path


def reconciled(events: list[dict]) -> dict[tuple[str, str], dict[str, str]]:
    """Per (host, mount): each path's last reconcile action and its detail."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for e in events:
        if e["op"] == RECONCILE and e.get("path"):
            key = (e.get("host") or "?", e.get("mount") or "?")
            out.setdefault(key, {})[e["path"]] = (str(e.get("action", "?")),
                                                   str(e.get("detail", "")))
    return out


def render_reconciled(found: dict) -> str:
    """What each host took from an image update, merged, kept, and left in conflict."""
    if not found:
        return ""
    lines = ["", "Image updates reconciled (rofs reconcile), per host:"]
    for (host, mount), paths in sorted(found.items()):
        counts = Counter(action for action, _ in paths.values())
        lines.append("  %s %s: %s" % (host, mount, ", ".join(
            "%d %s" % (n, action) for action, n in sorted(counts.items()))))
        for path, (action, detail) in sorted(paths.items()):
            lines.append("    %-9s %s  (%s)" % (action, path, detail))
    return "\n".join(lines) + "\n"


CUT_WORDS = {"queue": "dropped (over its share of the queue)",
             "space": "dropped (state filesystem short of space)",
             "error": "dropped (the log could not be written)",
             "rotated": "rotated out (old files removed)"}


def render_cuts(cuts: list[dict]) -> str:
    """Events each uid lost from the log, per mount: nothing when none was lost."""
    lines = []
    for c in cuts:
        for uid, kinds in sorted(c["cuts"].items(), key=lambda item: (
                not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0)):
            said = ", ".join("%d %s" % (kinds[k], CUT_WORDS[k]) for k in CUTS
                             if isinstance(kinds.get(k), int) and kinds[k])
            if said:
                lines.append("  %s %s uid %s: %s" % (c.get("host", "?"), c.get("mount", "?"),
                                                     uid, said))
    if not lines:
        return ""
    return "\n".join(["", "Events cut from the log, per uid:"] + lines) + "\n"


REPORT_DESCRIPTION = """\
Summarise write logs: per program, which paths it changed, how often, first and last
time, and the writes the read-only class refused.  LOG is a state dir (all its logs),
a log directory or a log file; logs of several hosts merge into one report."""


REPORT_EPILOG = """\
Paths under the exceptions list are left out (default: %s).

examples:
  rofs report /var/lib/stateless/state
  rofs report --suggest /var/lib/stateless/state > /etc/rofs/etc.policy
  rofs report --json host1.jsonl host2.jsonl"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rofs report", description=REPORT_DESCRIPTION,
        epilog=REPORT_EPILOG % " ".join(DEFAULT_EXCEPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", metavar="LOG", nargs="*",
                        help="state dir, log directory or log file")
    state_option(parser, "a state dir whose logs to read (the same as naming it as a LOG)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the report as JSON")
    out.add_argument("--suggest", action="store_true",
                     help="print the policy that keeps exactly what the logged workload "
                     "changed for good (a rofs policy file, with the statetab/rwtab "
                     "equivalents as comments)")
    parser.add_argument("--exceptions", metavar="FILE",
                        help="paths or patterns to leave out, one per line (replaces the "
                        "default list)")
    ignore_options(parser)
    parser.add_argument("--summary", action="store_true",
                        help="only the summary: changes per program and per top directory")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.logs += [args.state] if args.state else []
    if not args.logs:
        parser.error("name a state dir, log directory or log file (LOG or --state)")
    patterns = patterns_of(args)
    events, files, bad = load_events(args.logs)
    cuts = read_cuts(files)
    found = reconciled(events)
    events = [e for e in events if e["op"] != RECONCILE]
    if args.suggest:
        out = suggest(events, patterns, files)
    elif args.json:
        data = json.loads(as_json(summarize(events, patterns), files, bad))
        data["reconciled"] = [{"host": host, "mount": mount, "paths": {
            path: {"action": a, "detail": d} for path, (a, d) in sorted(paths.items())}}
            for (host, mount), paths in sorted(found.items())]
        data["cut"] = [{"host": c.get("host"), "mount": c.get("mount"), "uid": uid,
                        **{k: n for k, n in kinds.items() if k in CUTS}}
                       for c in cuts for uid, kinds in sorted(c["cuts"].items())]
        out = json.dumps(data, indent=1) + "\n"
    else:
        out = render(summarize(events, patterns), files, bad, args.summary) + \
            render_reconciled(found) + render_cuts(cuts)
    sys.stdout.write(out)
    return 0
