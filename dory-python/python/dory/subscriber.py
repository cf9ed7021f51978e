"""Helpers for consumers of a processor's output: drop the copies that at-least-once output
brings.

A Dory processor numbers its output: every message carries the message id
``<processor>:<epoch>:<sequence>`` and the headers ``dory-processor``, ``dory-epoch`` and
``dory-sequence``. Output is *at least once*: an instance that resumes from a checkpoint (after
a crash, a restart or a move) publishes again what was published after that checkpoint, with
the same sequence numbers and a **newer epoch**. So a copy is recognised by
``(processor, sequence)``, never by the whole message id.

:class:`Deduplicator` remembers, per processor, the highest sequence up to which it has seen
every message and a bounded set of the sequences seen above it (a message can come back out of
order), like ``dory_core::InputPosition`` does for a processor's own input::

    from dory.subscriber import Deduplicator

    seen = Deduplicator()

    def on_message(channel, method, properties, body):
        if seen.admit(properties.message_id):
            handle(body)
        channel.basic_ack(method.delivery_tag)

A consumer that is itself a Dory processor keeps :meth:`Deduplicator.to_state` in a declared
state attribute and rebuilds it with :meth:`Deduplicator.from_state`, so what it has seen
travels with its state. (A processor's ``ctx.inputs()`` already skips redelivered copies the
state holds; this class is for everything else that reads Dory output.)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["DEFAULT_WINDOW", "Deduplicator", "MessageId", "parse_message_id"]

#: How many sequences above the contiguous one :class:`Deduplicator` keeps per processor by
#: default.
DEFAULT_WINDOW = 4096

#: The header naming the producing processor.
HEADER_PROCESSOR = "dory-processor"
#: The header carrying the producer's epoch.
HEADER_EPOCH = "dory-epoch"
#: The header carrying the message's sequence number.
HEADER_SEQUENCE = "dory-sequence"


@dataclass(frozen=True)
class MessageId:
    """The parts of a message id ``<processor>:<epoch>:<sequence>``."""

    processor: str
    epoch: int
    sequence: int

    def __str__(self) -> str:
        """The message id, ``<processor>:<epoch>:<sequence>``."""
        return f"{self.processor}:{self.epoch}:{self.sequence}"


def parse_message_id(message_id: str) -> MessageId:
    """Splits ``<processor>:<epoch>:<sequence>``; raises :class:`ValueError` naming what is
    wrong when ``message_id`` is not one."""
    if not isinstance(message_id, str):
        raise ValueError(f"message id {message_id!r} is not a string")
    parts = message_id.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"message id {message_id!r} is not <processor>:<epoch>:<sequence>")
    processor, epoch, sequence = parts
    if not (epoch.isdigit() and sequence.isdigit()):
        raise ValueError(
            f"message id {message_id!r}: epoch and sequence must be non-negative integers"
        )
    return MessageId(processor, int(epoch), int(sequence))


def _text(value: Any) -> Optional[str]:
    """A header value as text (AMQP clients give ``bytes`` or ``str``)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return str(value)


def _number(value: Any) -> Optional[int]:
    """A header value as an integer (``int``, or its digits as ``bytes`` or ``str``)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii")
    if isinstance(value, bool):
        raise ValueError(f"sequence {value!r} is not an integer")
    return int(value)


class _Stream:
    """What one processor's stream has been seen of: every sequence up to ``contiguous``, and
    the sequences in ``above`` (all greater than ``contiguous + 1``). ``_heap`` holds the
    same sequences as ``above``, to find the smallest when the window is full."""

    __slots__ = ("contiguous", "above", "_heap")

    def __init__(self, contiguous: int = 0, above: Optional[List[int]] = None) -> None:
        """A stream seen up to ``contiguous`` and at ``above``."""
        self.contiguous = contiguous
        self.above = set(above or ())
        self._heap = list(self.above)
        heapq.heapify(self._heap)

    def contains(self, sequence: int) -> bool:
        """Whether ``sequence`` was seen."""
        return sequence <= self.contiguous or sequence in self.above

    def add(self, sequence: int, window: int) -> bool:
        """Records ``sequence``; false when it was seen already."""
        if self.contains(sequence):
            return False
        if sequence == self.contiguous + 1:
            self.contiguous = sequence
            self._absorb()
        else:
            self.above.add(sequence)
            heapq.heappush(self._heap, sequence)
            while len(self.above) > window:
                # Close the oldest gap: whatever was missing below the smallest sequence seen
                # is taken as seen from now on (a copy of it arriving later is dropped).
                self.contiguous = self._heap[0] - 1
                self._absorb()
        return True

    def _absorb(self) -> None:
        """Moves the run of sequences just above ``contiguous`` into it."""
        while self._heap and self._heap[0] <= self.contiguous + 1:
            smallest = heapq.heappop(self._heap)
            self.above.discard(smallest)
            self.contiguous = max(self.contiguous, smallest)


class Deduplicator:
    """Drops copies of Dory processor output, keyed on ``(processor, sequence)``.

    Memory per processor is bounded: the highest contiguous sequence plus at most ``window``
    sequences above it. When a message more than ``window`` messages ahead of a gap arrives,
    the oldest gap is closed: a message from inside it that arrives later is taken for a copy
    and dropped. A consumer that starts in the middle of a stream closes that first gap once,
    after ``window`` messages, or at once with :meth:`skip_to`.

    Not thread-safe: use one per consumer thread (or guard it with a lock).
    """

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        """``window``: how many sequences above the contiguous one are kept per processor
        (at least 1)."""
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.window = window
        self._streams: Dict[str, _Stream] = {}

    def admit(
        self,
        message_id: Optional[str] = None,
        *,
        processor: Optional[str] = None,
        sequence: Optional[int] = None,
    ) -> bool:
        """Records a message and says whether it is new (``True``: handle it) or a copy of
        one admitted before (``False``: drop it).

        Pass either the message id (``"<processor>:<epoch>:<sequence>"``, e.g. AMQP's
        ``properties.message_id``) or ``processor=`` and ``sequence=`` (e.g. from the
        ``dory-processor`` and ``dory-sequence`` headers). The epoch plays no part: a copy
        published again after a move or restore carries a newer epoch.
        """
        key = self._key(message_id, processor, sequence)
        stream = self._streams.get(key[0])
        if stream is None:
            stream = self._streams[key[0]] = _Stream()
        return stream.add(key[1], self.window)

    def admit_headers(self, headers: Optional[Mapping[str, Any]]) -> bool:
        """:meth:`admit` by the ``dory-processor`` and ``dory-sequence`` headers (values may
        be ``str``, ``bytes`` or ``int``, as AMQP clients give them). A message without them
        is not Dory output and cannot be recognised as a copy: it is always admitted."""
        headers = headers or {}
        processor = _text(headers.get(HEADER_PROCESSOR))
        sequence = _number(headers.get(HEADER_SEQUENCE))
        if processor is None or sequence is None:
            return True
        return self.admit(processor=processor, sequence=sequence)

    def seen(
        self,
        message_id: Optional[str] = None,
        *,
        processor: Optional[str] = None,
        sequence: Optional[int] = None,
    ) -> bool:
        """Whether a message was admitted before, without recording it (same arguments as
        :meth:`admit`)."""
        name, number = self._key(message_id, processor, sequence)
        stream = self._streams.get(name)
        return stream is not None and stream.contains(number)

    def skip_to(self, processor: str, sequence: int) -> None:
        """Takes every message of ``processor`` up to ``sequence`` as seen (a consumer that
        starts after them, e.g. from a position it stored itself)."""
        stream = self._streams.setdefault(processor, _Stream())
        if sequence > stream.contiguous:
            stream.contiguous = sequence
            stream._absorb()

    def contiguous(self, processor: str) -> int:
        """The highest sequence of ``processor`` up to which every message was seen (0:
        none)."""
        stream = self._streams.get(processor)
        return stream.contiguous if stream is not None else 0

    def processors(self) -> List[str]:
        """The processors seen, sorted."""
        return sorted(self._streams)

    def to_state(self) -> Dict[str, List[int]]:
        """What was seen as plain values, to keep in a processor's declared state: per
        processor, ``[contiguous, *sequences above it]``."""
        return {
            name: [s.contiguous, *sorted(s.above)] for name, s in sorted(self._streams.items())
        }

    @classmethod
    def from_state(cls, state: Mapping[str, List[int]], window: int = DEFAULT_WINDOW) -> "Deduplicator":
        """Rebuilds a deduplicator from :meth:`to_state`."""
        made = cls(window)
        for name, numbers in state.items():
            if not numbers:
                continue
            contiguous, *above = (int(n) for n in numbers)
            stream = _Stream(contiguous, [n for n in above if n > contiguous])
            stream._absorb()
            while len(stream.above) > window:
                stream.contiguous = stream._heap[0] - 1
                stream._absorb()
            made._streams[str(name)] = stream
        return made

    def __len__(self) -> int:
        """How many sequences are held above the contiguous ones, over every processor (the
        memory in use, besides one integer per processor)."""
        return sum(len(s.above) for s in self._streams.values())

    def __repr__(self) -> str:
        """The window and how much is held."""
        return f"Deduplicator(window={self.window}, processors={len(self._streams)}, held={len(self)})"

    @staticmethod
    def _key(
        message_id: Optional[str], processor: Optional[str], sequence: Optional[int]
    ) -> Tuple[str, int]:
        """The ``(processor, sequence)`` a message is known by, from either form."""
        if message_id is not None:
            if processor is not None or sequence is not None:
                raise ValueError("pass a message id or processor= and sequence=, not both")
            parsed = parse_message_id(message_id)
            return parsed.processor, parsed.sequence
        if processor is None or sequence is None:
            raise ValueError("pass a message id, or both processor= and sequence=")
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise ValueError(f"sequence {sequence!r} is not a non-negative integer")
        return str(processor), sequence
