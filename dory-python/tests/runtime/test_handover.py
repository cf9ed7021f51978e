"""A make-before-break move of a counter between two real processes, with the test as the
orchestrator, for the Rust and the Python counter: the count continues in RabbitMQ with no
gap and no duplicate, the old instance exits without saving and the new one saves its final
state on SIGTERM."""

from support.services import check_sequence


def test_count_continues_across_a_move(counter) -> None:
    # The orchestrator's first start: claim epoch 1, make it the owner, launch it.
    first = counter.orch.claim()
    assert first == 1
    one = counter.start("one", first)
    counter.wait_count(20)

    # The move: a replacement in standby, freeze the old one, hand its snapshot over, commit,
    # resume the replacement.
    second = counter.orch.claim_standby()
    assert second == 2
    two = counter.start("two", second, mode="standby")
    two.wait_phase("standby")
    frozen = one.freeze(timeout_ms=5000)
    assert frozen.status == 200, frozen
    meta = frozen.json()
    assert meta["processor"] == counter.processor and meta["epoch"] == first, meta
    health = one.health()
    assert health["phase"] == "frozen", health
    moved_at = int(health["sequence"])
    assert moved_at >= 20
    snapshot = one.fetch()
    assert one.fetch() == snapshot, "the frozen snapshot is the same on every GET"
    loaded = two.load(snapshot)
    assert loaded.status == 204, loaded
    assert two.load(snapshot).status == 204, "loading the same snapshot again is a no-op"
    assert counter.orch.commit_move(first, snapshot) == second
    resumed = two.resume()
    assert resumed.status == 204, resumed
    assert two.phase() == "running"
    counter.wait_count(moved_at + 20)

    # Shutdown: both get SIGTERM; the old one is frozen and no longer the owner.
    one.terminate()
    two.terminate()
    code_one, exit_one = one.exited()
    code_two, exit_two = two.exited()
    assert (code_one, exit_one) == (0, "not-owner"), "the old instance exits without saving"
    assert code_two == 0 and exit_two.startswith("saved sequence="), exit_two

    # The output: 1, 2, 3, ... with no gap and no duplicate, epoch 1 up to the move and epoch
    # 2 after it; each body is its sequence; the message id names all three.
    messages = counter.broker.drain()
    assert len(messages) >= moved_at + 20
    check_sequence(messages)
    for m in messages:
        assert m.text == str(m.sequence), m
        assert m.epoch == (first if m.sequence <= moved_at else second), (moved_at, m)
        assert m.processor == counter.processor, m
        assert m.message_id == f"{counter.processor}:{m.epoch}:{m.sequence}", m

    # The store: epoch 2 owns the processor and its final checkpoint is the latest.
    row = counter.db.ownership(counter.processor)
    assert row is not None and row["owner"] == second, row
    assert row["committed"] == (second, int(exit_two.split("=")[1])), row
