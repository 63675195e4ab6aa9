"""`rofs report`: who wrote where, from one or many write logs (docs/write-log.md).

The report groups the changes by program (its executable, else its command name): the
paths it changed, how often and with which operations, first and last time, and the
changes the read-only class refused.  Logs of several hosts merge into one report.
Paths matching the exceptions list (rolo's idea: /tmp and the like) are left out.

`--suggest` replays the changes in time order and prints the policy that keeps exactly
what the workload changed for good, and nothing it only used for a while (a temporary
file renamed over another, a lock created and removed): a rofs policy file whose
`default` is scratch, with the Fedora statetab/rwtab equivalents as comments.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from rofs.writelog import log_files

# Paths that are expected to be written and are not worth reporting (rolo shipped a
# similar list).  A pattern matches a path and everything below it.
DEFAULT_EXCEPTIONS = ["/tmp", "/var/tmp", "/run", "/var/run", "/dev", "/proc", "/sys",
                      "/var/lock"]

CREATES = {"create", "mknod", "mkdir", "symlink", "link"}
REMOVES = {"unlink", "rmdir"}


class ReportError(Exception):
    pass


def read_exceptions(path: str) -> list[str]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if not line.startswith("/") and not line.startswith("*"):
                    raise ReportError("%s:%d: %r is not an absolute path or pattern"
                                      % (path, number, line))
                out.append(line.rstrip("/") or "/")
    except OSError as e:
        raise ReportError("cannot read %s: %s" % (path, e.strerror)) from None
    return out


def _under(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def excepted(event: dict, key: str, patterns: list[str]) -> bool:
    """Whether event[key] is left out.  A pattern covering the whole mount (a mount
    inside /tmp) would leave out everything, so it does not apply to that mount."""
    path = event.get(key)
    if path is None:
        return False
    mount = event.get("mount") or ""
    return any(_under(path, p) and not _under(mount, p) for p in patterns)


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
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        bad += 1  # a line cut short by a crash, or not ours
                        continue
                    if isinstance(event, dict) and "op" in event and "t" in event:
                        events.append(event)
                    else:
                        bad += 1
        except OSError as e:
            raise ReportError("cannot read %s: %s" % (path, e.strerror)) from None
    events.sort(key=lambda e: e["t"])
    return events, files, bad


def program_of(event: dict) -> str:
    return event.get("exe") or event.get("comm") or "?"


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


def summarize(events: list[dict], exceptions: list[str]) -> tuple[list[ProgramStats], int]:
    programs: dict[str, ProgramStats] = {}
    ignored = 0
    for e in events:
        if excepted(e, "path", exceptions):
            ignored += 1
            continue
        name = program_of(e)
        p = programs.get(name)
        if p is None:
            p = programs[name] = ProgramStats(name, first=e["t"])
        p.names.add(e.get("comm") or "?")
        p.hosts.add(e.get("host") or "?")
        p.last = e["t"]
        result = e.get("result", "ok")
        if result == "EROFS":
            p.denied += 1
        elif result != "ok":
            p.failed += 1
        else:
            p.changes += 1
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
    return ordered, ignored


def _count(n: int, noun: str) -> str:
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render(programs: list[ProgramStats], files: list[str], bad: int, ignored: int) -> str:
    lines = []
    total = sum(p.changes for p in programs)
    denied = sum(p.denied for p in programs)
    hosts = set().union(*(p.hosts for p in programs)) if programs else set()
    lines.append("%s and %s by %s on %s, from %s" % (
        _count(total, "change"), _count(denied, "refused write"),
        _count(len(programs), "program"), _count(len(hosts), "host"),
        _count(len(files), "log file")))
    if ignored:
        lines.append("%d events left out by the exceptions list" % ignored)
    if bad:
        lines.append("%d log lines were not events (cut short?) and were skipped" % bad)
    for p in programs:
        lines.append("")
        extra = []
        if p.denied:
            extra.append("%d refused" % p.denied)
        if p.failed:
            extra.append("%d failed" % p.failed)
        lines.append("%s (%s): %d changes%s, %s .. %s, %s" % (
            p.program, ", ".join(sorted(p.names)), p.changes,
            " (%s)" % ", ".join(extra) if extra else "", _when(p.first), _when(p.last),
            "hosts " + ", ".join(sorted(p.hosts)) if len(p.hosts) > 1
            else "host " + next(iter(p.hosts))))
        for path, s in sorted(p.paths.items()):
            ops = ", ".join("%s x%d" % (op, n) if n > 1 else op
                            for op, n in sorted(s.ops.items()))
            lines.append("    %s  %s%s" % (path, ops, "  REFUSED x%d" % s.denied
                                            if s.denied else ""))
    return "\n".join(lines) + "\n"


def as_json(programs: list[ProgramStats], files: list[str], bad: int, ignored: int) -> str:
    return json.dumps({
        "files": files, "skipped_lines": bad, "ignored_by_exceptions": ignored,
        "programs": [{
            "program": p.program, "names": sorted(p.names), "hosts": sorted(p.hosts),
            "changes": p.changes, "refused": p.denied, "failed": p.failed,
            "first": p.first, "last": p.last,
            "paths": {path: {"ops": dict(s.ops), "refused": s.denied, "first": s.first,
                             "last": s.last} for path, s in sorted(p.paths.items())}}
            for p in programs]}, indent=1) + "\n"


# ---------------------------------------------------------------- suggestions


@dataclass
class Fate:
    """What a workload did to one path, replayed in time order."""

    existed: bool | None = None  # before the workload (None: cannot tell)
    exists: bool = True
    changed: bool = False
    programs: set = field(default_factory=set)


def replay(events: list[dict], exceptions: list[str]) -> tuple[dict[str, Fate], dict[str, set],
                                                                set[str]]:
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
        if path is None or excepted(e, "path", exceptions):
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
            if dst is None or excepted(e, "path2", exceptions):
                continue
            s, d = fate(src, op), fates.get(dst)
            if d is None:
                d = fates[dst] = Fate(existed=None)
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


def suggest(events: list[dict], exceptions: list[str], files: list[str]) -> str:
    fates, refused, explicit_scratch = replay(events, exceptions)
    keep = sorted(p for p, f in fates.items() if f.changed and p not in explicit_scratch)
    # A kept directory covers everything below it.
    covered = []
    for path in keep:
        if not any(path.startswith(k.rstrip("/") + "/") for k in covered):
            covered.append(path)
    transient = sorted(p for p, f in fates.items() if not f.changed)
    lines = ["# rofs policy suggested by `rofs report --suggest` from %d events in %s."
             % (len(events), ", ".join(files) or "no log"),
             "# Changes to these paths are kept; everything else is wiped at the next "
             "mount.",
             "default scratch"]
    for path in covered:
        lines.append("persistent %s" % path)
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


def main(args) -> int:
    exceptions = DEFAULT_EXCEPTIONS if args.exceptions is None else \
        read_exceptions(args.exceptions)
    events, files, bad = load_events(args.logs)
    if args.suggest:
        out = suggest(events, exceptions, files)
    else:
        programs, ignored = summarize(events, exceptions)
        out = (as_json if args.json else render)(programs, files, bad, ignored)
    os.write(1, out.encode())
    return 0
