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

Lines end at `\n` only; words are separated by spaces and tabs; a word starting with
`#` comments out the rest of its line; a class or rwtab line may name several paths;
paths are in the escaped form of rofs.store.quoting (`\x20` for a space), the form every rofs
command prints, so a name can never be read as syntax.  Parsing is strict: a malformed
line is an error naming the file and the line, and nothing is mounted.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field

from rofs.store.quoting import quote, unquote

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
# What a mount does when it finds the image changed (docs/image-updates.md).
ON_IMAGE_CHANGE = ("reconcile", "warn", "keep")
ON_IMAGE_CHANGE_KEYWORD = "on-image-change"


# Rules every mount has (a policy file may override them): fusermount3 takes its lock
# in /etc/mtab.fuselock when /etc/mtab is not a symlink, so `fusermount3 -u /etc` would
# hold a file open on the very mount it unmounts (EBUSY) and leave the lock in the
# state.  On a read-only /etc the open fails and fusermount3 goes on without it; rofs
# answers the same.
BUILT_IN = [(b"/etc/mtab.fuselock", Class.READ_ONLY, "fusermount3's lock file, as on a "
             "read-only /etc")]
BUILT_IN_SOURCE = "built in: "


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
    # What a mount does when the image changed (rofs.store.reconcile.ON_IMAGE_CHANGE); None:
    # not said here (the command line's, else the default).
    on_image_change: str | None = None
    _depth: int | None = field(default=None, repr=False, compare=False)

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

    @property
    def depth(self) -> int:
        """Components of the longest rule's path: no prefix longer can match, so the
        cost of a lookup is bounded by the policy, not by how deep a user's tree is."""
        if self._depth is None:
            self._depth = max(map(len, self.rules), default=0)
        return self._depth

    def rule_for(self, path: Path) -> Rule | None:
        """The rule deciding `path`: the longest one naming it or a parent."""
        rules = self.rules
        if not rules:
            return None
        for end in range(min(len(path), self.depth), -1, -1):
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

    def add(self, absolute: bytes, cls: Class, kind: str, source: str) -> None:
        path = self.relative(absolute)
        if path is None and source.startswith(BUILT_IN_SOURCE):
            return
        if path is None:
            self.notes.append("%s: %s is outside the mount %s: ignored"
                              % (source, quote(absolute), quote(self.mountpoint)))
            return
        self.rules[path] = Rule(path, cls, kind, source)
        self._depth = None

    def relative(self, absolute: bytes) -> Path | None:
        """`absolute` as components below the mountpoint, or None if outside it."""
        norm = os.path.normpath(absolute)
        mnt = os.fsencode(self.mountpoint).rstrip(b"/")
        if norm == mnt or (mnt == b"" and norm == b"/"):
            return ()
        if not norm.startswith(mnt + b"/"):
            return None
        return tuple(norm[len(mnt) + 1:].split(b"/"))


# ---------------------------------------------------------------- parsing

# Words are separated by spaces and tabs only (str.split would also split on the
# Unicode separators a name may hold); a word starting with `#` begins a comment.
_WORD = re.compile(r"[^ \t]+")


def _lines(path: str):
    """(line number, words) of the meaningful lines of a config file: lines end at
    `\n` only, a `#` starting a word comments out the rest of the line, and words are
    in the escaped form of rofs.store.quoting (checked by the callers that read paths)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyError("cannot read %s: %s" % (path, e.strerror)) from None
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]  # a file written on Windows
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise PolicyError("%s:%d: not valid UTF-8 (write other bytes as \\xHH)"
                              % (path, number)) from None
        words = []
        for word in _WORD.findall(line):
            if word.startswith("#"):
                break
            words.append(word)
        for ch in " ".join(words):
            if not ch.isprintable() and ch != " ":
                raise PolicyError("%s:%d: character U+%04X in the line: write it as "
                                  "\\xHH (its UTF-8 bytes)" % (path, number, ord(ch)))
        if words:
            yield number, words


def _path_arg(where: str, value: str) -> bytes:
    """An absolute path written in the escaped form, as bytes."""
    try:
        path = unquote(value)
    except ValueError as e:
        raise PolicyError("%s: %s" % (where, e)) from None
    if not path.startswith(b"/"):
        raise PolicyError("%s: %s is not an absolute path" % (where, quote(path)))
    if b"\0" in path:
        raise PolicyError("%s: path contains a NUL byte" % where)
    return path


def parse_class(value: str) -> Class:
    try:
        return Class(value)
    except ValueError:
        raise PolicyError("unknown class %r (expected %s)"
                          % (value, ", ".join(CLASS_NAMES))) from None


def read_rwtab(policy: Policy, path: str) -> None:
    """Fedora rwtab: `empty PATH`, `dirs PATH`, `files PATH`, all scratch."""
    for number, words in _lines(path):
        where = "%s:%d" % (path, number)
        if len(words) != 2 or words[0] not in KINDS:
            raise PolicyError("%s: expected `empty|dirs|files PATH`, got %r%s"
                              % (where, " ".join(words), _SPACES_HINT
                                 if len(words) > 2 and words[0] in KINDS else ""))
        policy.add(_path_arg(where, words[1]), Class.SCRATCH, words[0], where)


def read_statetab(policy: Policy, path: str) -> None:
    """Fedora statetab: one path per line, all persistent."""
    for number, words in _lines(path):
        where = "%s:%d" % (path, number)
        if len(words) != 1:
            raise PolicyError("%s: one path per line, got %r%s"
                              % (where, " ".join(words), _SPACES_HINT))
        policy.add(_path_arg(where, words[0]), Class.PERSISTENT, "files", where)


_SPACES_HINT = " (a space in a path is written \\x20)"


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
        policy.notes.append("no rwtab or statetab in %s" % quote(etc))
    for path in rwtab:
        read_rwtab(policy, path)
    for path in statetab:
        read_statetab(policy, path)


def read_policy_file(policy: Policy, path: str, fedora_etc) -> None:
    """rofs's own format (docs/policy.md):

        default persistent|scratch|read-only
        persistent|scratch|read-only PATH [PATH...]
        empty|dirs|files PATH [PATH...]     (rwtab lines: scratch)
        rwtab [ETCDIR]                      (read the Fedora files from ETCDIR)
        on-image-change reconcile|warn|keep (docs/image-updates.md)

    `fedora_etc(argument)` resolves the directory of an `rwtab` line.
    """
    for number, words in _lines(path):
        word, args = words[0], words[1:]
        where = "%s:%d" % (path, number)
        if word == "default":
            if len(args) != 1 or args[0] not in CLASS_NAMES:
                raise PolicyError("%s: `default` takes one of %s, got %r"
                                  % (where, ", ".join(CLASS_NAMES), " ".join(args)))
            policy.default = Class(args[0])
        elif word == ON_IMAGE_CHANGE_KEYWORD:
            if len(args) != 1 or args[0] not in ON_IMAGE_CHANGE:
                raise PolicyError("%s: `%s` takes one of %s, got %r"
                                  % (where, word, ", ".join(ON_IMAGE_CHANGE), " ".join(args)))
            policy.on_image_change = args[0]
        elif word == "rwtab":
            if len(args) > 1:
                raise PolicyError("%s: `rwtab` takes at most one directory, got %r%s"
                                  % (where, " ".join(args), _SPACES_HINT))
            etc = os.fsdecode(_path_arg(where, args[0])) if args else None
            read_fedora(policy, fedora_etc(etc))
        elif word in CLASS_NAMES or word in KINDS:
            if not args:
                raise PolicyError("%s: `%s` needs a PATH" % (where, word))
            cls, kind = (Class(word), "files") if word in CLASS_NAMES else \
                (Class.SCRATCH, word)
            for arg in args:
                policy.add(_path_arg(where, arg), cls, kind, where)
        else:
            raise PolicyError("%s: unknown keyword %r (expected default, rwtab, %s, %s or %s)"
                              % (where, word, ON_IMAGE_CHANGE_KEYWORD, ", ".join(CLASS_NAMES),
                                 ", ".join(KINDS)))


def load(mountpoint: str, lower: str, *, policy_file: str | None = None,
         rwtab: str | None = None, default: str | None = None) -> Policy:
    """The policy of one mount.  Order (a later rule for the same path wins): the
    Fedora files asked for on the command line, the policy file, then --default.

    `rwtab` is "" for "the Fedora files of this system" (the lower layer's when mounting
    over /etc, so the image's own files; /etc otherwise), or a directory.
    """
    policy = Policy(mountpoint=os.path.normpath(mountpoint))
    for path, cls, why in BUILT_IN:
        policy.add(path, cls, "files", BUILT_IN_SOURCE + why)

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


def to_data(policy: Policy) -> dict:
    """The policy as JSON-able data (a server of a new version takes over a mount with
    the policy the mount started with: `from_data`)."""
    return {"mountpoint": policy.mountpoint, "default": policy.default.value,
            "on_image_change": policy.on_image_change, "notes": list(policy.notes),
            "rules": [[[os.fsdecode(c) for c in r.path], r.cls.value, r.kind, r.source]
                      for r in policy.rules.values()]}


def from_data(data: dict) -> Policy:
    policy = Policy(mountpoint=data["mountpoint"], default=Class(data["default"]),
                    notes=list(data["notes"]), on_image_change=data["on_image_change"])
    for components, cls, kind, source in data["rules"]:
        path = tuple(os.fsencode(c) for c in components)
        policy.rules[path] = Rule(path, Class(cls), kind, source)
    return policy
