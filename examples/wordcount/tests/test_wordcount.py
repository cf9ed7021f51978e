"""``wordcount`` end to end: words in from a RabbitMQ queue, running counts out, state in
Postgres. A copy of an input message (same producer and sequence) is not counted twice, a
crash republishes only what consumers drop by message id, and a restart restores the counts.
"""

import json
from collections import Counter as Tally
from typing import Dict, List

from dory.subscriber import Deduplicator
from support.fixtures import Counter
from support.services import Received, check_sequence

from wordcount import words

TEXT = [
    "to be or not to be",
    "that is the question",
    "whether tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune",
    "or to take arms against a sea of troubles",
    "and by opposing end them",
]


def lines(n: int) -> List[str]:
    """``n`` input lines, cycling through the text."""
    return [TEXT[i % len(TEXT)] for i in range(n)]


def final_counts(outputs: List[Received]) -> Dict[str, int]:
    """The last running count of each word in the (deduplicated) output."""
    last: Dict[str, int] = {}
    for m in outputs:
        for word, count in json.loads(m.body).items():
            assert count > last.get(word, 0), (
                f"the running count of {word!r} went from {last.get(word, 0)} to {count}: {m}"
            )
            last[word] = count
    return last


def test_wordcount_counts_each_input_once_across_a_crash_and_a_restart(py_processor: Counter) -> None:
    p = py_processor
    queue = p.broker.input_queue("words")
    sent: List[str] = []

    def send(texts: List[str]) -> None:
        for text in texts:
            sent.append(text)
            p.broker.send(queue, text.encode(), producer="words-source", sequence=len(sent))

    def start(name: str):
        return p.start(
            name,
            p.orch.claim(),
            spec="wordcount:WordCount",
            config={},
            input_url=p.broker.input_url(queue, prefetch="50"),
        )

    send(lines(30))
    one = start("one")
    p.wait_count(30)
    # Copies of inputs 3 and 5 (the same producer and sequence, as a broker redelivers them
    # or a producer publishes again after its own restart) are not counted again.
    for seq in (3, 5):
        p.broker.send(queue, sent[seq - 1].encode(), producer="words-source", sequence=seq)
    send(["question"])
    p.wait_count(31)

    # A crash: whatever was published after the last checkpoint is published again by the
    # next instance, with the same sequences; inputs not yet acknowledged come back.
    one.kill()
    send(lines(12))
    two = start("two")
    eventually_outputs = 31 + 12
    seen = Deduplicator()
    outputs: List[Received] = []

    def take() -> int:
        for m in p.broker.drain():
            if seen.admit(m.message_id):
                outputs.append(m)
        return len(outputs)

    from support import eventually

    eventually("every input counted once", 30, lambda: take() >= eventually_outputs or None)
    # A restart: SIGTERM saves, the next start restores the counts.
    exits = [two.stop()]
    send(["to be"])
    three = start("three")
    eventually("the count after the restart", 30, lambda: take() >= eventually_outputs + 1 or None)
    exits.append(three.stop())
    take()

    assert len(outputs) == eventually_outputs + 1, [m.text for m in outputs]
    check_sequence(outputs)
    expected = Tally(w for text in sent for w in words(text))
    assert final_counts(outputs) == dict(expected)
    assert json.loads(outputs[-1].body) == {"be": expected["be"], "to": expected["to"]}
    assert outputs[0].epoch == 1 and outputs[-1].epoch == 3
    for code, line in exits:
        assert code == 0 and line.startswith("saved sequence="), (code, line)


def test_wordcount_moves_with_its_input(py_processor: Counter) -> None:
    """A make-before-break move while lines keep arriving: the frozen instance gives back the
    input it had taken but not processed, the replacement continues the counts and the
    output sequence, and every line is counted once."""
    p = py_processor
    queue = p.broker.input_queue("words")
    sent: List[str] = []

    def send(texts: List[str]) -> None:
        for text in texts:
            sent.append(text)
            p.broker.send(queue, text.encode(), producer="words-source", sequence=len(sent))

    def launch(name: str, epoch: int, mode: str):
        return p.start(
            name,
            epoch,
            mode=mode,
            spec="wordcount:WordCount",
            config={},
            input_url=p.broker.input_url(queue, prefetch="50"),
        )

    first = p.orch.claim()
    one = launch("one", first, "restore")
    send(lines(20))
    p.wait_count(20)
    second = p.orch.claim_standby()
    two = launch("two", second, "standby")
    two.wait_phase("standby")
    send(lines(10))
    frozen = one.freeze()
    assert frozen.status == 200, frozen
    # The snapshot's sequence is the state's version; health says the output sequence.
    moved_at = int(one.health()["sequence"])
    snapshot = one.fetch()
    send(lines(10))
    assert two.load(snapshot).status == 204
    p.orch.commit_move(first, snapshot)
    assert two.resume().status == 204
    p.wait_count(40)
    exits = [one.stop(), two.stop()]

    outputs = p.broker.drain()
    check_sequence(outputs)
    assert len(outputs) == 40, [m.text for m in outputs]
    assert [m.epoch for m in outputs] == [first if m.sequence <= moved_at else second for m in outputs]
    assert final_counts(outputs) == dict(Tally(w for text in sent for w in words(text)))
    assert exits[0] == (0, "not-owner"), exits
    assert exits[1][0] == 0 and exits[1][1].startswith("saved sequence="), exits
