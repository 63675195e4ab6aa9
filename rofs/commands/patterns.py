"""Paths to leave out, which `rofs report` and `rofs diff` share: the exceptions list,
--exceptions FILE, --ignore PATTERN and --ignore-file FILE.  A pattern is a glob over
paths in the escaped form of rofs.store.quoting; it matches a path and everything below
it."""

from __future__ import annotations

import re


class PatternError(Exception):
    """A pattern or pattern file a user gave that cannot be used (exit code 2)."""


# Paths that are expected to be written and are not worth reporting (rolo shipped a
# similar list).  A pattern matches a path and everything below it.
DEFAULT_EXCEPTIONS = ["/tmp", "/var/tmp", "/run", "/var/run", "/dev", "/proc", "/sys",
                      "/var/lock"]


def read_patterns(path: str) -> list[str]:
    """Patterns from a file: one per line (lines end at \\n only), `#` comments."""
    out = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PatternError("cannot read %s: %s" % (path, e.strerror)) from None
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("utf-8", "replace").strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        try:
            check_pattern(line)
        except PatternError as e:
            raise PatternError("%s:%d: %s" % (path, number, e)) from None
        out.append(line)
    return out


def check_pattern(pattern: str) -> str:
    if not pattern.startswith(("/", "*")):
        raise PatternError("%r is not an absolute path or pattern" % pattern)
    return pattern


def compile_pattern(pattern: str) -> re.Pattern:
    """A glob over escaped paths: `*` and `?` within one component, `**` across any
    number, `[...]` a class; it also matches everything below what it matches."""
    pattern = pattern.rstrip("/") or "/"
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[%s%s]" % ("^" if body.startswith("!") else "",
                                   re.escape(body.lstrip("!"))))
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    body = "".join(out)
    if body.endswith("/.*"):  # `DIR/**` is DIR and everything below it
        body = body[:-3]
    return re.compile("(?:%s)(?:/.*)?" % body, re.S)


class Patterns:
    """Paths left out: the exceptions list and --ignore patterns."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = list(patterns)
        self._compiled = [compile_pattern(p) for p in patterns]

    def match(self, path: str) -> bool:
        return any(c.fullmatch(path) for c in self._compiled)

    def leaves_out(self, path: str | None, mount: str = "") -> bool:
        """Whether `path` is left out.  A pattern covering the whole mount (a mount
        inside /tmp) would leave out everything, so it does not apply to that mount."""
        if path is None:
            return False
        return any(c.fullmatch(path) and not (mount and c.fullmatch(mount))
                   for c in self._compiled)


def patterns_of(args, exceptions: bool = True) -> Patterns:
    """The exceptions list (or --exceptions FILE; none without `exceptions`) plus
    --ignore and --ignore-file."""
    found = [] if not exceptions else DEFAULT_EXCEPTIONS if args.exceptions is None else \
        read_patterns(args.exceptions)
    found = found + [check_pattern(p) for p in args.ignore or []]
    for path in args.ignore_file or []:
        found += read_patterns(path)
    return Patterns(found)
