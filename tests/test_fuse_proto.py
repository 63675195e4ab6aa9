"""rofs.fuse.proto against <linux/fuse.h>: the size of every structure rofs reads or
writes, as the kernel's header (7.38) declares them (measured with sizeof() in C)."""

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


def test_times_split_into_seconds_and_nanoseconds():
    assert proto.split_ns(1_500_000_000) == (1, 500_000_000)
    assert proto.split_ns(-1) == (0xFFFFFFFFFFFFFFFF, 999_999_999)
