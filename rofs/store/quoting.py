"""Names are data, never syntax: how rofs writes a name into text, and reads it back.

A file name is any bytes but `/` and NUL, and the user who created it chose them.  So
every text rofs writes (reports, suggested policies, diffs, check and status output,
the daemon's log lines, the write log) shows names in one escaped form, in which one
name is always one field on one line, and the policy parser reads the same form back:

- printable characters stand for themselves: ASCII from `!` to `~`, and any other
  printable Unicode character of a name that is valid UTF-8;
- a backslash is written `\\\\`;
- every other byte is `\\xHH` (two lowercase hex digits): space, tab, newline and
  other control characters, bytes that are not UTF-8, and the UTF-8 bytes of
  characters Unicode does not call printable (NEL U+0085, LINE SEPARATOR U+2028,
  no-break and other spaces, format characters such as the bidirectional overrides).

So `/etc/my file` is written `/etc/my\\x20file`, and a name holding a newline never
starts a new line.  `unquote` accepts exactly these escapes.
"""

from __future__ import annotations

import re

_SAFE_ASCII = frozenset(range(0x21, 0x7f)) - {ord("\\")}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|\\)")


def _is_plain(data: bytes) -> bool:
    return all(b in _SAFE_ASCII for b in data)


def quote(name: bytes | str) -> str:
    """`name` (bytes; a str is taken as os.fsencode would give it) in the escaped form."""
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    if _is_plain(name):
        return name.decode("ascii")
    out = []
    text = name.decode("utf-8", "surrogateescape")
    for ch in text:
        code = ord(ch)
        if code < 0x80:
            out.append(ch if code in _SAFE_ASCII else
                       "\\\\" if ch == "\\" else "\\x%02x" % code)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append("\\x%02x" % (code - 0xDC00))
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend("\\x%02x" % b for b in ch.encode("utf-8"))
    return "".join(out)


def quote_path(path: tuple[bytes, ...], base: str = "") -> str:
    """A path of components below `base` (an already escaped absolute path, "" or "/"
    for the root), escaped: `base/a/b`."""
    base = base.rstrip("/")
    if not path:
        return base or "/"
    return base + "/" + "/".join(quote(c) for c in path)


def unquote(text: str) -> bytes:
    """The bytes an escaped name stands for.  ValueError for a stray backslash."""
    if "\\" not in text:
        return text.encode("utf-8", "surrogateescape")
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        if "\\" in text[pos:m.start()]:
            break
        out += text[pos:m.start()].encode("utf-8", "surrogateescape")
        escape = m.group(1)
        out += b"\\" if escape == "\\" else bytes([int(escape[1:], 16)])
        pos = m.end()
    rest = text[pos:]
    if "\\" in rest:
        raise ValueError("a backslash starts an escape: \\\\ or \\xHH, not %r"
                         % rest[rest.index("\\"):rest.index("\\") + 4])
    out += rest.encode("utf-8", "surrogateescape")
    return bytes(out)


def top_dir(base: str, path: str) -> str:
    """The top directory of an escaped `path` below the escaped mountpoint `base`: its
    first component, or `base` itself for what is directly in it (a summary's rows)."""
    base = base.rstrip("/")
    rest = path[len(base) + 1:] if path.startswith(base + "/") else ""
    if "/" not in rest:
        return base or "/"
    return base + "/" + rest.split("/", 1)[0]


def count(n: int, noun: str) -> str:
    """ "1 change", "2 changes": how every rofs output counts things."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")
