"""rofs.fuse.proto against <linux/fuse.h>: every structure rofs reads or writes, field
by field (width and signedness) as the kernel's header declares them, and their sizes
(measured with sizeof() in C against the 7.38 header)."""

import os
import re
import struct

import pytest

from rofs.fuse import proto

KERNEL_SIZES = {
    "fuse_in_header": 40,
    "fuse_out_header": 16,
    "fuse_attr": 88,
    "fuse_entry_out": 128,
    "fuse_attr_out": 104,
    "fuse_init_out": 64,
    "fuse_open_out": 16,
    "fuse_setattr_in": 88,
    "fuse_read_in": 40,
    "fuse_write_in": 40,
    "fuse_release_in": 24,
    "fuse_create_in": 16,
    "fuse_mknod_in": 16,
    "fuse_rename2_in": 16,
    "fuse_setxattr_in": 16,
    "fuse_statfs_out": 80,
    "fuse_ioctl_in": 32,
    "fuse_ioctl_out": 16,
    "fuse_lseek_in": 24,
    "fuse_copy_file_range_in": 56,
    "fuse_fallocate_in": 32,
    "fuse_dirent": 24,
    "fuse_notify_inval_inode_out": 24,
    "fuse_notify_inval_entry_out": 16,
    "fuse_notify_delete_out": 24,
}


def test_every_structure_has_the_kernel_s_size():
    assert {name: proto.SIZES[name] for name in KERNEL_SIZES} == KERNEL_SIZES


HEADER = "/usr/include/linux/fuse.h"
TYPES = {"uint64_t": (8, False), "int64_t": (8, True), "uint32_t": (4, False),
         "int32_t": (4, True), "uint16_t": (2, False), "int16_t": (2, True),
         "uint8_t": (1, False), "char": (1, True)}
FORMATS = {"Q": (8, False), "q": (8, True), "I": (4, False), "i": (4, True),
           "H": (2, False), "h": (2, True), "B": (1, False), "b": (1, True)}


def header_structs(text):
    """struct name -> [(field, width, signed)], nested structs expanded, flexible
    arrays (char name[]) left out."""
    raw = {m.group(1): m.group(2) for m in re.finditer(r"struct (\w+) \{(.*?)\};", text,
                                                        re.S)}
    out = {}

    def fields(name):
        if name in out:
            return out[name]
        found = []
        body = re.sub(r"/\*.*?\*/", "", raw[name], flags=re.S)
        for m in re.finditer(r"(struct \w+|\w+)\s+(\w+)(?:\[(\d*)\])?;", body):
            kind, field, count = m.groups()
            if count == "":
                continue  # a flexible array: the name of a dirent
            n = int(count) if count else 1
            if kind.startswith("struct "):
                found += fields(kind.split()[1]) * n
            else:
                width, signed = TYPES[kind]
                found += [(field, width, signed)] * n
        out[name] = found
        return found

    return {name: fields(name) for name in raw}


def ours(fmt):
    """[(width, signed) or (bytes, None) for padding] of a struct format."""
    out = []
    for count, char in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        n = int(count) if count else 1
        if char == "x":
            out.append((n, None))
        else:
            out += [FORMATS[char]] * n
    return out


def test_every_field_is_decoded_with_the_header_s_width_and_the_kernel_s_sign():
    """Field by field against the header: the same width, and the same signedness but
    where proto.LAYOUT says the kernel means loff_t or time64_t by an unsigned field;
    padding (x) covers whole fields (unused, spare)."""
    if not os.path.exists(HEADER):
        pytest.skip("%s is missing (setup.sh --test installs linux-libc-dev)" % HEADER)
    with open(HEADER) as f:
        structs = header_structs(f.read())
    for name, packed, signed_by_meaning in proto.LAYOUT:
        theirs = list(structs[name])
        if name in proto.PARTIAL:  # the head only
            while sum(w for _, w, _ in theirs) > packed.size:
                theirs.pop()
        assert packed.size == sum(w for _, w, _ in theirs), name
        listed = set(signed_by_meaning)
        for width, signed in ours(packed.format):
            field, their_width, their_signed = theirs.pop(0)
            if signed is None:  # padding: as many of the header's bytes
                left = width - their_width
                while left > 0:
                    left -= theirs.pop(0)[1]
                assert left == 0, (name, field)
                continue
            assert width == their_width, (name, field)
            if field in signed_by_meaning:
                assert signed and not their_signed, (name, field)
                listed.discard(field)
            else:
                assert signed == their_signed, (name, field)
        assert not theirs and not listed, (name, theirs, listed)
    assert struct.calcsize("<q") == 8


def test_dirent_records_are_padded_to_8_bytes():
    assert proto.dirent_size(1, False) == 32 and proto.dirent_size(8, False) == 32
    assert proto.dirent_size(9, False) == 40
    assert proto.dirent_size(1, True) == 32 + proto.ENTRY_OUT.size


def test_times_before_1970_reach_the_kernel_as_it_reads_them(tmp_path):
    """Seconds are signed (the kernel's u64 read as time64_t); nanoseconds count
    forward."""
    from rofs.ops import attr_out
    from rofs.overlay import Attr
    path = tmp_path / "old"
    path.write_text("")
    os.utime(path, ns=(-1, -1_500_000_000))
    reply = attr_out(Attr(os.stat(path), 5, 1))
    fields = proto.ATTR_OUT.unpack(reply)
    atime, mtime, atimensec, mtimensec = fields[6], fields[7], fields[9], fields[10]
    assert (atime, atimensec) == (-1, 999_999_999)
    assert (mtime, mtimensec) == (-2, 500_000_000)
    # the bytes the kernel reads: two's complement in its u64 field
    start = proto.ATTR_OUT.size - proto.ATTR.size + 24
    assert reply[start:start + 16] == b"\xff" * 8 + b"\xfe" + b"\xff" * 7
