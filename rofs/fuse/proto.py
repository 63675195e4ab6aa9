"""The kernel's FUSE protocol, as <linux/fuse.h> defines it: opcodes, flags, and the
structures rofs reads and writes, as precompiled `struct.Struct`s (little-endian, the
only byte order the kernel speaks to a daemon on the machines rofs runs on).

rofs speaks protocol 7.31 or later (Linux 5.4+): the structure sizes here are the
current ones, which every kernel since then reads and writes.  Nothing here knows about
overlays.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38  # what rofs implements; the kernel uses min(its, ours)
MIN_MINOR_VERSION = 31
ROOT_ID = 1

# Opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = (
    8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = (
    27, 28, 29, 30, 31, 32, 33, 34, 35)
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE = (
    36, 37, 38, 39, 40, 41, 42, 43)
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS = (
    44, 45, 46, 47, 48, 49, 50)
TMPFILE = 51

# Notifications (the `error` field of an unsolicited message)
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY, NOTIFY_DELETE = 2, 3, 6
# Protocol 7.40 (Linux 6.9), which rofs does not claim (nothing else of 7.39-7.40 is
# needed): the kernel sends the requests a server read and never answered again, each
# unique marked with UNIQUE_RESEND; an INIT offering HAS_RESEND says it can.
NOTIFY_RESEND = 7
UNIQUE_RESEND = 1 << 63
HAS_RESEND = 1 << 39

# INIT flags
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30

# FOPEN_* (open replies)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5

# SETATTR valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_32BIT = 1 << 3
IOCTL_DIR = 1 << 4

# Structures.  Each field is decoded as the kernel means it, whatever <linux/fuse.h>
# spells: file offsets and lengths (loff_t) and times (time64_t) are signed ('q': a
# caller's lseek(fd, -1, SEEK_DATA) arrives as -1, to be answered as a filesystem
# answers it, ENXIO), sizes, counts, ids, handles and flags unsigned.
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen -
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr (times signed: before 1970)
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # fuse_entry_out
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])  # fuse_attr_out
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQqQqqqIIIIIIII")  # size and times signed
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QqIIQII")  # fh offset size read_flags lock_owner flags pad
# READDIR(PLUS) has READ_IN's layout, but its offset is the filesystem's own cookie.
READDIR_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QqIIQII")  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("<IIII")  # size flags setxattr_flags padding (SETXATTR_EXT)
SETXATTR_IN_COMPAT = struct.Struct("<II")  # size flags
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
INTERRUPT_IN = struct.Struct("<Q")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize
#                                             namelen frsize padding spare[6]
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")  # result flags in_iovs out_iovs
LSEEK_IN = struct.Struct("<QqII")  # fh offset whence padding
FALLOCATE_IN = struct.Struct("<QqqII")  # fh offset length mode padding
LSEEK_OUT = struct.Struct("<q")
COPY_FILE_RANGE_IN = struct.Struct("<QqQQqQQ")  # fh_in off_in nodeid_out fh_out off_out
#                                                 len flags
DIRENT = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags
NOTIFY_DELETE_OUT = struct.Struct("<QQII")  # parent child namelen padding

# Every structure rofs reads or writes, by its name in <linux/fuse.h>, with the fields
# it decodes as signed where the header spells them unsigned: the kernel means loff_t
# (a file offset or length) or time64_t there.  tests/test_fuse_proto.py checks each
# against the header, field by field: width, and signedness but for these.
LAYOUT = [
    ("fuse_in_header", IN_HEADER, ()),
    ("fuse_out_header", OUT_HEADER, ()),
    ("fuse_attr", ATTR, ("atime", "mtime", "ctime")),
    ("fuse_entry_out", ENTRY_OUT, ("atime", "mtime", "ctime")),
    ("fuse_attr_out", ATTR_OUT, ("atime", "mtime", "ctime")),
    ("fuse_init_in", INIT_IN, ()),
    ("fuse_init_out", INIT_OUT, ()),
    ("fuse_open_in", OPEN_IN, ()),
    ("fuse_open_out", OPEN_OUT, ()),
    ("fuse_create_in", CREATE_IN, ()),
    ("fuse_getattr_in", GETATTR_IN, ()),
    ("fuse_setattr_in", SETATTR_IN, ("size", "atime", "mtime", "ctime")),
    ("fuse_mknod_in", MKNOD_IN, ()),
    ("fuse_mkdir_in", MKDIR_IN, ()),
    ("fuse_rename_in", RENAME_IN, ()),
    ("fuse_rename2_in", RENAME2_IN, ()),
    ("fuse_link_in", LINK_IN, ()),
    ("fuse_read_in", READ_IN, ("offset",)),
    ("fuse_read_in", READDIR_IN, ()),  # READDIR's offset is the filesystem's cookie
    ("fuse_write_in", WRITE_IN, ("offset",)),
    ("fuse_write_out", WRITE_OUT, ()),
    ("fuse_release_in", RELEASE_IN, ()),
    ("fuse_fsync_in", FSYNC_IN, ()),
    ("fuse_setxattr_in", SETXATTR_IN, ()),
    ("fuse_getxattr_in", GETXATTR_IN, ()),
    ("fuse_getxattr_out", GETXATTR_OUT, ()),
    ("fuse_access_in", ACCESS_IN, ()),
    ("fuse_forget_in", FORGET_IN, ()),
    ("fuse_batch_forget_in", BATCH_FORGET_IN, ()),
    ("fuse_forget_one", FORGET_ONE, ()),
    ("fuse_interrupt_in", INTERRUPT_IN, ()),
    ("fuse_statfs_out", STATFS_OUT, ()),
    ("fuse_ioctl_in", IOCTL_IN, ()),
    ("fuse_ioctl_out", IOCTL_OUT, ()),
    ("fuse_lseek_in", LSEEK_IN, ("offset",)),
    ("fuse_lseek_out", LSEEK_OUT, ("offset",)),
    ("fuse_fallocate_in", FALLOCATE_IN, ("offset", "length")),
    ("fuse_copy_file_range_in", COPY_FILE_RANGE_IN, ("off_in", "off_out")),
    ("fuse_dirent", DIRENT, ()),
    ("fuse_notify_inval_inode_out", NOTIFY_INVAL_INODE_OUT, ()),
    ("fuse_notify_inval_entry_out", NOTIFY_INVAL_ENTRY_OUT, ()),
    ("fuse_notify_delete_out", NOTIFY_DELETE_OUT, ()),
]
SIZES = {name: struct.size for name, struct, _ in LAYOUT}
# Decoded in part: INIT_IN's flags2 and what follows exist from 7.36 on, read only when
# the kernel's flags say INIT_EXT.
PARTIAL = {"fuse_init_in"}


def dirent_size(namelen: int, plus: bool) -> int:
    """The bytes one entry of a READDIR (plus: READDIRPLUS) reply takes, padded to 8."""
    size = DIRENT.size + namelen + (ENTRY_OUT.size if plus else 0)
    return (size + 7) & ~7
