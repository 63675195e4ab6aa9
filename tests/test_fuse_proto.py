"""rofs.fuse.proto against <linux/fuse.h>: the size of every structure rofs reads or
writes, as the kernel's header (7.38) declares them (measured with sizeof() in C)."""

import os

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
    assert proto.SIZES == KERNEL_SIZES


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
