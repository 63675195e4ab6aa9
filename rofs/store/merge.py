"""Merging a file changed both on this host and in a new image, against its content at
copy-up (the base): account files per entry (passwd, group, shadow, gshadow, and their
shadow-utils backups NAME-), subuid/subgid per line, other text three-way with merge3.
Pure functions on bytes; reconcile (rofs.store.reconcile) decides what to merge and
what a conflict leaves.
"""

from __future__ import annotations

from rofs.store.quoting import quote

# Account files merged per entry: the name of the id field's index (None: no ids), and
# whose names left out of the first leave theirs out too.
ACCOUNTS = {b"passwd": 2, b"group": 2, b"shadow": None, b"gshadow": None}
SHADOWED_BY = {b"shadow": b"passwd", b"gshadow": b"group"}
RANGES = (b"subuid", b"subgid")


def account_kind(name: bytes) -> bytes | None:
    """Which account file `name` is (shadow-utils' backups, NAME-, are merged alike)."""
    kind = name[:-1] if name.endswith(b"-") else name
    return kind if kind in ACCOUNTS or kind in RANGES else None


def entry_lines(data: bytes) -> bool:
    """Whether every line of `data` (but blank and # lines) is NAME:FIELDS."""
    return all(b":" in line for line in data.split(b"\n")
               if line.strip() and not line.startswith(b"#"))


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(True)


def merge_text(base: bytes, here: bytes, new: bytes) -> bytes | None:
    """A three-way line merge (merge3, the merge of bzr/Breezy: no git needed on the
    host, and in memory); None when the changes overlap.  ImportError without merge3
    (rofs itself needs only the standard library: only this merge needs it)."""
    import merge3
    m = merge3.Merge3(_lines(base), _lines(here), _lines(new))
    out = []
    for group in m.merge_groups():
        if group[0] == "conflict":
            return None
        out += group[1]
    return b"".join(out)


def _entries(data: bytes) -> tuple[list[tuple[bytes | None, bytes]], dict[bytes, list[bytes]]]:
    """The lines of an account file, each with its entry's name (None for a line that
    is no entry), and the entries by name (fields)."""
    lines, by_name = [], {}
    for line in data.split(b"\n"):
        if b":" in line and not line.startswith(b"#"):
            fields = line.split(b":")
            if fields[0] and fields[0] not in by_name:
                by_name[fields[0]] = fields
                lines.append((fields[0], line))
                continue
        lines.append((None, line))
    if lines and lines[-1] == (None, b""):
        lines.pop()
    return lines, by_name


def merge_accounts(kind: bytes, base: bytes, here: bytes, new: bytes,
                   left_out: set[bytes]) -> tuple[bytes, list[str]]:
    """passwd, group, shadow or gshadow merged per entry, keyed by name: the image's new
    entries appear, the host's stay, a field changed here wins, the image's changes to
    fields not changed here are taken, an entry the image removed goes unless changed
    here.  An entry the image added whose id another entry here already has is left out
    (a conflict, never a duplicate id); its name joins `left_out`, and the shadow file
    leaves it out too.  Returns the merged file and the conflicts."""
    id_field = ACCOUNTS[kind]
    _, b = _entries(base)
    here_lines, h = _entries(here)
    new_lines, n = _entries(new)
    conflicts: list[str] = []
    what = {b"passwd": "user", b"shadow": "user", b"group": "group",
            b"gshadow": "group"}[kind]
    out: list[tuple[bytes | None, bytes]] = []
    for name, line in here_lines:
        if name is None:
            out.append((None, line))
            continue
        hf, bf, nf = h[name], b.get(name), n.get(name)
        if bf is None:
            if nf is not None and nf != hf:
                conflicts.append("%s %s: added here and by the image, differently; this "
                                 "host's kept" % (what, quote(name)))
            out.append((name, line))
        elif nf is None:
            if hf != bf:
                conflicts.append("%s %s: removed by the image, changed here; kept"
                                 % (what, quote(name)))
                out.append((name, line))
        elif len(hf) != len(bf) or len(nf) != len(bf):
            out.append((name, line))
            if nf != bf:
                conflicts.append("%s %s: fields added or removed; this host's kept"
                                 % (what, quote(name)))
        else:
            merged = []
            for i, (x, y, z) in enumerate(zip(hf, bf, nf, strict=True)):
                if x != y and z != y and x != z:
                    conflicts.append("%s %s: field %d changed here and by the image; this "
                                     "host's kept" % (what, quote(name), i + 1))
                merged.append(x if x != y else z)
            out.append((name, b":".join(merged)))
    ids = {h[name][id_field]: name for name, _ in out
           if name is not None and id_field is not None and len(h[name]) > id_field}
    present = {name for name, _ in out if name is not None}
    # The image's new entries, each after the entry before it in the image's file.
    previous: bytes | None = None
    for name, line in new_lines:
        if name is None:
            continue
        if name in b or name in present or name in h:
            previous = name
            continue
        if name in left_out:
            continue
        fields = n[name]
        if id_field is not None and len(fields) > id_field and fields[id_field] in ids:
            conflicts.append("%s %s of the image has id %s, which %s %s has here: left "
                             "out" % (what, quote(name), fields[id_field].decode(
                                 errors="replace"), what, quote(ids[fields[id_field]])))
            left_out.add(name)
            continue
        at = 0  # (first in the image's file: first here too)
        if previous is not None:
            at = next((i + 1 for i, (nm, _) in enumerate(out) if nm == previous), len(out))
        out.insert(at, (name, line))
        present.add(name)
        if id_field is not None and len(fields) > id_field:
            ids[fields[id_field]] = name
        previous = name
    return b"".join(line + b"\n" for _, line in out), conflicts


def merge_ranges(base: bytes, here: bytes, new: bytes) -> tuple[bytes, list[str]]:
    """subuid/subgid (NAME:START:COUNT, a name may have several): the image's new lines
    appear unless they overlap a range another name has here, lines the image removed go
    unless this host has them anew, the host's stay."""
    b = set(base.splitlines())
    n = set(new.splitlines())
    lines = [line for line in here.splitlines() if not (line in b and line not in n)]
    conflicts = []

    def span(line: bytes):
        parts = line.split(b":")
        try:
            return parts[0], int(parts[1]), int(parts[1]) + int(parts[2])
        except (IndexError, ValueError):
            return None

    have = set(lines)
    spans = [x for x in map(span, lines) if x is not None]
    for line in new.splitlines():
        if line in b or line in have:
            continue
        mine = span(line)
        clash = next((o for o in spans if mine and o[0] != mine[0] and o[1] < mine[2] and
                      mine[1] < o[2]), None) if mine else None
        if clash is not None:
            conflicts.append("range %s of the image overlaps one of %s here: left out"
                             % (quote(line), quote(clash[0])))
            continue
        lines.append(line)
        have.add(line)
        if mine:
            spans.append(mine)
    return b"".join(line + b"\n" for line in lines), conflicts
