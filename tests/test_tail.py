"""A room's tail (``chatd.tail``) and the receipt coalescer
(``chatd.throttle``): pure logic, driven directly."""

from __future__ import annotations

from chatd.store import NewMessage, StoredMessage
from chatd.tail import TAIL, Tail
from chatd.throttle import Coalescer


def stored(id_: int, seq: int, mentions: tuple[int, ...] | None = None) -> StoredMessage:
    message = NewMessage(1, "a", "x", "text", "t", room="r", mentions=mentions)
    return StoredMessage(id_, message, seq)


def test_a_tail_maps_its_ids_to_seqs() -> None:
    tail = Tail()
    for seq, id_ in enumerate((10, 12, 15, 40), start=1):
        tail.add(stored(id_, seq))
    assert (tail.last_id, tail.last_seq, tail.first_seq) == (40, 4, 1)
    assert [tail.seq_of(i) for i in (10, 12, 15, 40)] == [1, 2, 3, 4]
    assert tail.seq_of(13) == -1  # between two of the room's ids: another room's
    assert tail.seq_of(9) is None and tail.seq_of(41) is None  # beyond what it holds


def test_a_gap_starts_the_tail_afresh_and_old_seqs_are_ignored() -> None:
    tail = Tail()
    tail.add(stored(1, 1))
    tail.add(stored(2, 2))
    tail.add(stored(2, 2))  # delivered again: ignored
    tail.add(stored(9, 5))  # seqs 3 and 4 never came here
    assert (tail.ids, tail.first_seq, tail.last_seq) == ([9], 5, 5)
    assert tail.seq_of(2) is None


def test_a_seed_is_where_the_tail_starts_unless_it_is_ahead() -> None:
    tail = Tail()
    tail.seed(100, 50)
    assert (tail.last_id, tail.last_seq, tail.ids) == (100, 50, [])
    assert tail.seq_of(100) is None  # the store knows it; the tail does not
    assert tail.mentions_after(7, 50) == 0
    assert tail.mentions_after(7, 49) is None
    tail.add(stored(101, 51))
    tail.seed(90, 45)  # older than what it holds: nothing changes
    assert (tail.ids, tail.last_seq) == ([101], 51)


def test_mentions_after_a_seq_count_within_the_tail() -> None:
    tail = Tail()
    tail.add(stored(1, 1, (7,)))
    tail.add(stored(2, 2))
    tail.add(stored(3, 3, (7, 8)))
    tail.add(stored(4, 4, (8,)))
    assert [tail.mentions_after(7, s) for s in (0, 1, 2, 3, 4)] == [2, 1, 1, 0, 0]
    assert tail.mentions_after(8, 0) == 2


def test_a_tail_keeps_a_bounded_number_of_messages() -> None:
    tail = Tail()
    for seq in range(1, 10 * TAIL):
        tail.add(stored(seq * 2, seq))
    assert TAIL <= len(tail.ids) < 2 * TAIL
    assert tail.seq_of(tail.ids[0]) == tail.first_seq
    assert tail.seq_of(2 * (10 * TAIL - 1)) == 10 * TAIL - 1


def test_the_coalescer_sends_the_first_at_once_and_the_newest_at_the_periods_end() -> None:
    c: Coalescer[str, int] = Coalescer(1.0)
    assert c.offer("a", 1, 10.0) is True
    assert c.offer("a", 2, 10.2) is False
    assert c.offer("a", 3, 10.5) is False
    assert c.offer("b", 9, 10.5) is True  # keys are independent
    assert c.next_due() == 11.0
    assert c.due(10.9) == []
    assert c.due(11.0) == [3]  # the newest; 2 never goes
    assert c.next_due() is None
    assert c.offer("a", 4, 11.5) is False  # a period after the trailing one
    assert c.due(12.0) == [4]
    assert c.offer("a", 5, 13.5) is True  # quiet for a period: at once again


def test_the_coalescer_forgets_quiet_keys() -> None:
    c: Coalescer[int, int] = Coalescer(1.0)
    for key in range(1000):
        c.offer(key, key, 0.0)
    c.due(5.0)
    assert len(c._sent) == 0
