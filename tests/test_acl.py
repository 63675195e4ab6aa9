"""rofs.store.acl: the inheritance rule of posix_acl_create(), on the xattr form.  (Through a
mount, against kernel overlayfs: test_hostile.py.)"""

import errno

import pytest

from rofs.store import acl
from rofs.store.acl import GROUP_OBJ, MASK, OTHER, USER, USER_OBJ


def entries(*triples):
    return acl.pack([list(t) for t in triples])


def test_a_default_of_base_entries_only_gives_a_mode_and_no_access_acl():
    default = entries((USER_OBJ, 7, 0), (GROUP_OBJ, 0, 0), (OTHER, 0, 0))
    assert acl.inherit(default, 0o100666) == (0o100600, None)
    assert acl.inherit(default, 0o40777) == (0o40700, None)


def test_named_entries_give_an_access_acl_whose_mask_is_the_group_class():
    default = entries((USER_OBJ, 7, 0), (USER, 7, 65534), (GROUP_OBJ, 5, 0),
                      (MASK, 7, 0), (OTHER, 5, 0))
    mode, access = acl.inherit(default, 0o100644)
    assert mode == 0o100644
    # The mask takes the mode's group bits; the named entry keeps rwx, masked to r.
    assert acl.parse(access) == [[USER_OBJ, 6, 0], [USER, 7, 65534], [GROUP_OBJ, 5, 0],
                                 [MASK, 4, 0], [OTHER, 4, 0]]


def test_the_file_type_and_special_bits_pass_through():
    default = entries((USER_OBJ, 7, 0), (GROUP_OBJ, 7, 0), (OTHER, 0, 0))
    assert acl.inherit(default, 0o42775) == (0o42770, None)


@pytest.mark.parametrize("value", [b"", b"\x02\x00\x00\x00\x01", b"\x01\x00\x00\x00",
                                   entries((USER_OBJ, 7, 0), (OTHER, 0, 0))])
def test_what_no_filesystem_stores_is_eio(value):
    with pytest.raises(OSError) as e:
        acl.inherit(value, 0o100644)
    assert e.value.errno == errno.EIO
