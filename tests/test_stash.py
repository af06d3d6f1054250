import pytest

from gateway import Message, StashKey
from gateway.stash import Stash


def test_keys_are_distinct_by_identity() -> None:
    a, b = StashKey[int](), StashKey[int]()
    stash = Stash()
    stash[a] = 1
    assert stash[a] == 1 and b not in stash and stash.get(b, None) is None
    assert stash.setdefault(b, 2) == 2 and stash.setdefault(b, 3) == 2
    del stash[a]
    assert len(stash) == 1
    with pytest.raises(KeyError):
        stash[a]


def test_each_message_has_its_own_stash() -> None:
    key = StashKey[str]()
    m1, m2 = Message(b"x"), Message(b"x")
    m1.stash[key] = "one"
    assert key not in m2.stash
    assert m1 == m2  # the stash is not part of the message's value
