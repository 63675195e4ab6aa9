"""POSIX ACLs in their xattr form (system.posix_acl_access/_default): what a new entry
inherits from its parent's default ACL.

rofs negotiates FUSE_POSIX_ACL, so the kernel checks the ACLs rofs reports, as it does on
a local filesystem.  Inheritance on create is the filesystem's part: rofs builds a new
entry in the work dir, not in its parent, so the upper filesystem cannot inherit for it.
`inherit` is the rule of the kernel's posix_acl_create(): the requested mode and the
default ACL are intersected; the result is the entry's mode and, unless it says no more
than the mode, its access ACL; a directory also takes the default ACL itself.

The xattr form: a little-endian u32 version (2), then 8-byte entries (u16 tag, u16
permission bits, u32 uid or gid).
"""

from __future__ import annotations

import errno
import os
import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def parse(value: bytes) -> list[list[int]]:
    """[tag, perm, id] entries; EIO for what no filesystem stores."""
    body = len(value) - _HEADER.size
    if body < 0 or body % _ENTRY.size or _HEADER.unpack_from(value)[0] != VERSION:
        raise OSError(errno.EIO, "malformed POSIX ACL xattr")
    return [list(e) for e in _ENTRY.iter_unpack(value[_HEADER.size:])]


def pack(entries: list[list[int]]) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def inherit(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """The mode and access ACL (None: the mode says it all) of a new entry created with
    `mode` in a directory whose default ACL is `default`."""
    entries = parse(default)
    bits = mode & 0o777
    group = mask = None
    extended = False
    for entry in entries:
        tag = entry[0]
        if tag == USER_OBJ:
            entry[1] &= bits >> 6
            bits = bits & ~0o700 | entry[1] << 6
        elif tag == OTHER:
            entry[1] &= bits & 0o7
            bits = bits & ~0o7 | entry[1]
        elif tag == GROUP_OBJ:
            group = entry
        elif tag == MASK:
            mask = entry
            extended = True
        elif tag in (USER, GROUP):
            extended = True
    # The group class bits of the mode are the mask's, or the owning group's.
    holder = mask if mask is not None else group
    if holder is None:
        raise OSError(errno.EIO, "POSIX ACL without a group entry")
    holder[1] &= (bits >> 3) & 0o7
    bits = bits & ~0o70 | holder[1] << 3
    return mode & ~0o777 | bits, pack(entries) if extended else None


def default_of(target: bytes | int, follow: bool) -> bytes | None:
    """A directory's default ACL, or None (none set, or a filesystem without ACLs)."""
    try:
        return os.getxattr(target, DEFAULT, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
