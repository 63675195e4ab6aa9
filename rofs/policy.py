"""Per-path policy: which changes persist, which are wiped at the next mount, which fail.

Three classes, after Fedora's readonly-root (see docs/policy.md):
- persistent: changes are kept in the state dir (what rofs does without a policy);
- scratch: changes work like any other until the next mount, which wipes them, so the
  lower layer shows through again (rwtab `files`), or the path starts out as an empty
  directory (rwtab `empty`) or as the lower directory's tree of directories without
  their files (rwtab `dirs`);
- read-only: every change fails with EROFS.

A path's class is that of the longest rule naming it or one of its parent directories,
else the default.  Rules come from rofs's own policy file and, when asked, from the
Fedora files rwtab, rwtab.d/*, statetab and statetab.d/*.  Paths are absolute, as the
system sees them; a rule outside the mount is ignored with a note.

Parsing is strict: a malformed line is an error naming the file and the line, and
nothing is mounted.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

Path = tuple[bytes, ...]  # components below the mount; () is the mount itself


class PolicyError(Exception):
    """A policy source cannot be used: one line for the user (exit code 2)."""


class Class(enum.Enum):
    PERSISTENT = "persistent"
    SCRATCH = "scratch"
    READ_ONLY = "read-only"


CLASS_NAMES = [c.value for c in Class]
# rwtab kinds: how a scratch path starts out after the wipe at mount.
KINDS = ("files", "empty", "dirs")


@dataclass(frozen=True)
class Rule:
    path: Path
    cls: Class
    kind: str  # for scratch: "files", "empty" or "dirs"; "files" otherwise
    source: str  # FILE:LINE, or the command-line option


@dataclass
class Policy:
    mountpoint: str = "/"
    default: Class = Class.PERSISTENT
    rules: dict[Path, Rule] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # rules ignored, and why

    @property
    def trivial(self) -> bool:
        """Everything persistent: no check needed anywhere."""
        return self.default is Class.PERSISTENT and all(
            r.cls is Class.PERSISTENT for r in self.rules.values())

    @property
    def has_scratch(self) -> bool:
        return self.default is Class.SCRATCH or any(
            r.cls is Class.SCRATCH for r in self.rules.values())

    @property
    def has_read_only(self) -> bool:
        return self.default is Class.READ_ONLY or any(
            r.cls is Class.READ_ONLY for r in self.rules.values())

    def rule_for(self, path: Path) -> Rule | None:
        """The rule deciding `path`: the longest one naming it or a parent."""
        rules = self.rules
        for end in range(len(path), -1, -1):
            rule = rules.get(path[:end])
            if rule is not None:
                return rule
        return None

    def classify(self, path: Path) -> Class:
        rule = self.rule_for(path)
        return self.default if rule is None else rule.cls

    def rules_below(self, path: Path) -> list[Rule]:
        """Rules strictly inside `path`."""
        n = len(path)
        return [r for p, r in self.rules.items() if len(p) > n and p[:n] == path]

    def add(self, absolute: str, cls: Class, kind: str, source: str) -> None:
        path = self.relative(absolute)
        if path is None:
            self.notes.append("%s: %s is outside the mount %s: ignored"
                              % (source, absolute, self.mountpoint))
            return
        self.rules[path] = Rule(path, cls, kind, source)

    def relative(self, absolute: str) -> Path | None:
        """`absolute` as components below the mountpoint, or None if outside it."""
        norm = os.path.normpath(absolute)
        mnt = self.mountpoint.rstrip("/")
        if norm == mnt or (mnt == "" and norm == "/"):
            return ()
        if not norm.startswith(mnt + "/"):
            return None
        return tuple(os.fsencode(part) for part in norm[len(mnt) + 1:].split("/"))



# ---------------------------------------------------------------- parsing


def _lines(path: str):
    """(line number, stripped text) of the meaningful lines of a config file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyError("cannot read %s: %s" % (path, e.strerror)) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PolicyError("%s:%d: not valid UTF-8" % (path, line)) from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def _path_arg(path: str, number: int, value: str) -> str:
    if not value.startswith("/"):
        raise PolicyError("%s:%d: %r is not an absolute path" % (path, number, value))
    if "\0" in value:
        raise PolicyError("%s:%d: path contains a NUL byte" % (path, number))
    return value


def parse_class(value: str) -> Class:
    try:
        return Class(value)
    except ValueError:
        raise PolicyError("unknown class %r (expected %s)"
                          % (value, ", ".join(CLASS_NAMES))) from None


def read_rwtab(policy: Policy, path: str) -> None:
    """Fedora rwtab: `empty PATH`, `dirs PATH`, `files PATH`, all scratch."""
    for number, line in _lines(path):
        parts = line.split(None, 1)
        if len(parts) != 2 or parts[0] not in KINDS:
            raise PolicyError("%s:%d: expected `empty|dirs|files PATH`, got %r"
                              % (path, number, line))
        policy.add(_path_arg(path, number, parts[1]), Class.SCRATCH, parts[0],
                   "%s:%d" % (path, number))


def read_statetab(policy: Policy, path: str) -> None:
    """Fedora statetab: one path per line, all persistent."""
    for number, line in _lines(path):
        policy.add(_path_arg(path, number, line), Class.PERSISTENT, "files",
                   "%s:%d" % (path, number))


def _conf_files(etc: str, name: str) -> list[str]:
    files = [os.path.join(etc, name)] if os.path.isfile(os.path.join(etc, name)) else []
    d = os.path.join(etc, name + ".d")
    if os.path.isdir(d):
        files += [os.path.join(d, n) for n in sorted(os.listdir(d))
                  if not n.startswith(".") and os.path.isfile(os.path.join(d, n))]
    return files


def read_fedora(policy: Policy, etc: str) -> None:
    """rwtab, rwtab.d/*, statetab and statetab.d/* of the directory `etc` (those that
    exist; none at all is worth a note, not an error)."""
    rwtab, statetab = _conf_files(etc, "rwtab"), _conf_files(etc, "statetab")
    if not rwtab and not statetab:
        policy.notes.append("no rwtab or statetab in %s" % etc)
    for path in rwtab:
        read_rwtab(policy, path)
    for path in statetab:
        read_statetab(policy, path)


def read_policy_file(policy: Policy, path: str, fedora_etc) -> None:
    """rofs's own format (docs/policy.md):

        default persistent|scratch|read-only
        persistent|scratch|read-only PATH
        empty|dirs|files PATH          (rwtab lines: scratch)
        rwtab [ETCDIR]                 (read the Fedora files from ETCDIR)

    `fedora_etc(argument)` resolves the directory of an `rwtab` line.
    """
    for number, line in _lines(path):
        parts = line.split(None, 1)
        word, value = parts[0], parts[1].strip() if len(parts) > 1 else ""
        where = "%s:%d" % (path, number)
        if word == "default":
            if value not in CLASS_NAMES:
                raise PolicyError("%s: `default` takes one of %s, got %r"
                                  % (where, ", ".join(CLASS_NAMES), value))
            policy.default = Class(value)
        elif word == "rwtab":
            if value and not value.startswith("/"):
                raise PolicyError("%s: %r is not an absolute path" % (where, value))
            read_fedora(policy, fedora_etc(value or None))
        elif word in CLASS_NAMES:
            if not value:
                raise PolicyError("%s: `%s` needs a PATH" % (where, word))
            policy.add(_path_arg(path, number, value), Class(word), "files", where)
        elif word in KINDS:
            if not value:
                raise PolicyError("%s: `%s` needs a PATH" % (where, word))
            policy.add(_path_arg(path, number, value), Class.SCRATCH, word, where)
        else:
            raise PolicyError("%s: unknown keyword %r (expected default, rwtab, %s or %s)"
                              % (where, word, ", ".join(CLASS_NAMES), ", ".join(KINDS)))


def load(mountpoint: str, lower: str, *, policy_file: str | None = None,
         rwtab: str | None = None, default: str | None = None) -> Policy:
    """The policy of one mount.  Order (a later rule for the same path wins): the
    Fedora files asked for on the command line, the policy file, then --default.

    `rwtab` is "" for "the Fedora files of this system" (the lower layer's when mounting
    over /etc, so the image's own files; /etc otherwise), or a directory.
    """
    policy = Policy(mountpoint=os.path.normpath(mountpoint))

    def fedora_etc(arg: str | None) -> str:
        if arg:
            return arg
        return lower if policy.mountpoint == "/etc" else "/etc"

    if rwtab is not None:
        read_fedora(policy, fedora_etc(rwtab))
    if policy_file is not None:
        read_policy_file(policy, policy_file, fedora_etc)
    if default is not None:
        policy.default = parse_class(default)
    return policy
