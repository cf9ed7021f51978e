"""``dory.subscriber``: dropping copies of processor output by (processor, sequence)."""

import random

import pytest

from dory.subscriber import Deduplicator, MessageId, parse_message_id


def test_message_ids_parse() -> None:
    assert parse_message_id("counter:3:17") == MessageId("counter", 3, 17)
    assert str(MessageId("counter", 3, 17)) == "counter:3:17"
    # Only the last two colons separate: a producer name with one still parses.
    assert parse_message_id("a:b:1:2") == MessageId("a:b", 1, 2)
    for bad in ["", "counter", "counter:1", ":1:2", "counter:x:2", "counter:1:-2", "c:1:2.0"]:
        with pytest.raises(ValueError):
            parse_message_id(bad)


def test_copies_after_a_move_carry_a_newer_epoch_and_are_dropped() -> None:
    seen = Deduplicator()
    assert [seen.admit(f"counter:1:{s}") for s in (1, 2, 3)] == [True] * 3
    # Epoch 2 resumed from the checkpoint at 2: it publishes 3 again, then goes on.
    assert seen.admit("counter:2:3") is False
    assert seen.admit("counter:2:4") is True
    assert seen.admit("counter:1:4") is False
    assert seen.contiguous("counter") == 4
    assert len(seen) == 0


def test_identity_from_the_id_or_from_headers_is_the_same() -> None:
    seen = Deduplicator()
    assert seen.admit(processor="counter", sequence=1)
    assert not seen.admit("counter:9:1")
    assert not seen.admit_headers({"dory-processor": b"counter", "dory-sequence": 1})
    assert seen.admit_headers({"dory-processor": "counter", "dory-epoch": 2, "dory-sequence": 2})
    assert not seen.seen("counter:1:3")
    assert seen.seen(processor="counter", sequence=2)
    # Processors are independent.
    assert seen.admit("other:1:1")
    assert seen.processors() == ["counter", "other"]
    # Without Dory headers a message cannot be recognised: always handled.
    assert seen.admit_headers({}) and seen.admit_headers(None) and seen.admit_headers({"x": 1})


def test_bad_arguments_are_refused() -> None:
    seen = Deduplicator()
    with pytest.raises(ValueError):
        seen.admit()
    with pytest.raises(ValueError):
        seen.admit(processor="p")
    with pytest.raises(ValueError):
        seen.admit("p:1:1", processor="p", sequence=1)
    with pytest.raises(ValueError):
        seen.admit(processor="p", sequence=-1)
    with pytest.raises(ValueError):
        seen.admit(processor="p", sequence=True)
    with pytest.raises(ValueError):
        Deduplicator(window=0)


def test_out_of_order_messages_are_still_new_once() -> None:
    seen = Deduplicator()
    order = [1, 2, 5, 4, 7, 3, 6, 6, 3, 8]
    assert [seen.admit(processor="p", sequence=s) for s in order] == [
        True, True, True, True, True, True, True, False, False, True,
    ]
    assert seen.contiguous("p") == 8
    assert len(seen) == 0


def test_memory_stays_bounded_and_the_oldest_gap_closes() -> None:
    seen = Deduplicator(window=10)
    # Sequence 1 never arrives: everything from 2 on waits above a gap.
    for s in range(2, 12):
        assert seen.admit(processor="p", sequence=s)
    assert len(seen) == 10 and seen.contiguous("p") == 0
    # The eleventh above the gap closes it: 1 is taken as seen from now on.
    assert seen.admit(processor="p", sequence=12)
    assert seen.contiguous("p") == 12 and len(seen) == 0
    assert not seen.admit(processor="p", sequence=1)
    # Many gaps: never more than the window held.
    for s in range(14, 200, 2):
        seen.admit(processor="p", sequence=s)
        assert len(seen) <= 10
    assert seen.contiguous("p") >= 170


def test_a_random_stream_with_copies_admits_each_sequence_exactly_once() -> None:
    rng = random.Random(7)
    stream = list(range(1, 2001))
    # Copies published again after "restores", and local reordering.
    for _ in range(300):
        at = rng.randrange(len(stream))
        stream.insert(at, stream[max(0, at - rng.randrange(1, 50))])
    for i in range(0, len(stream) - 5, 7):
        j = i + rng.randrange(1, 5)
        stream[i], stream[j] = stream[j], stream[i]
    seen = Deduplicator(window=64)
    admitted = [s for s in stream if seen.admit(processor="p", sequence=s)]
    assert sorted(admitted) == list(range(1, 2001))
    assert seen.contiguous("p") == 2000


def test_skip_to_starts_in_the_middle_of_a_stream() -> None:
    seen = Deduplicator()
    seen.skip_to("p", 1000)
    assert not seen.admit(processor="p", sequence=1000)
    assert seen.admit(processor="p", sequence=1001)
    assert seen.contiguous("p") == 1001
    seen.skip_to("p", 10)  # never backwards
    assert seen.contiguous("p") == 1001
    # A gap filled by skipping is absorbed with what was held above it.
    seen.admit(processor="p", sequence=1005)
    seen.skip_to("p", 1004)
    assert seen.contiguous("p") == 1005 and len(seen) == 0


def test_state_round_trips_as_plain_values() -> None:
    seen = Deduplicator(window=100)
    for s in (1, 2, 3, 7, 9):
        seen.admit(processor="a", sequence=s)
    seen.admit("b:4:1")
    state = seen.to_state()
    assert state == {"a": [3, 7, 9], "b": [1]}
    back = Deduplicator.from_state(state, window=100)
    assert back.to_state() == state
    assert not back.admit(processor="a", sequence=7)
    assert back.admit(processor="a", sequence=4)
    # A smaller window on the way back closes the oldest gaps.
    small = Deduplicator.from_state({"a": [0, 5, 6, 9]}, window=1)
    assert small.contiguous("a") == 6 and len(small) == 1
    assert "held=" in repr(small)
