"""The control endpoints of a real instance, Rust and Python: the bearer token, the body
limit, refused snapshots that leave the instance as it was, and a freeze that times out
cleanly when the processor is stuck in user code."""

import time

from support import eventually
from support.services import check_bodies, check_sequence

#: dory_control::wire::DEFAULT_BODY_LIMIT.
DEFAULT_BODY_LIMIT = 256 << 20


def test_state_routes_need_the_token(counter) -> None:
    one = counter.start("one", counter.orch.claim())
    counter.wait_count(3)
    for method, path in [
        ("POST", "/state/freeze"),
        ("GET", "/state"),
        ("PUT", "/state"),
        ("POST", "/state/resume"),
    ]:
        for token in (None, "wrong-token", one.token + "x", one.token[:-1]):
            answer = one.request(method, path, b"", token=token)
            assert answer.status == 401, (method, path, token, answer)
            assert answer.error == "unauthorized", answer
            assert answer.headers.get("www-authenticate") == "Bearer", answer
    basic = one.request("POST", "/state/freeze", headers={"Authorization": "Basic dG9rZW4="}, token=None)
    assert basic.status == 401, basic
    # Health, readiness and metrics need no token; the instance kept running throughout.
    assert one.request("GET", "/healthz", token=None).status == 200
    assert one.request("GET", "/readyz", token=None).status == 200
    assert one.request("GET", "/metrics", token=None).status == 200
    assert one.phase() == "running"
    before = counter.broker.count()
    counter.wait_count(before + 3)


def test_a_body_over_the_limit_gets_413(counter) -> None:
    counter.orch.claim()
    standby = counter.start("standby", counter.orch.claim_standby(), mode="standby")
    standby.wait_phase("standby")
    answer = standby.declare_length("PUT", "/state", DEFAULT_BODY_LIMIT + 1)
    assert answer.status == 413, answer
    assert answer.error == "too_large", answer
    # Refused before reading: the instance still stands by with nothing loaded.
    assert standby.phase() == "standby"
    assert standby.resume().status == 409, "nothing was loaded"


def test_refused_snapshots_leave_the_instance_as_it_was(counter) -> None:
    first = counter.orch.claim()
    one = counter.start("one", first)
    counter.wait_count(10)
    second = counter.orch.claim_standby()
    two = counter.start("two", second, mode="standby")
    two.wait_phase("standby")

    # A running instance takes no snapshot at all.
    assert one.load(b"whatever").status == 409
    assert one.freeze().status == 200
    moved_at = int(one.health()["sequence"])
    good = one.fetch()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    for name, bad in [
        ("empty", b""),
        ("garbage", b"not a snapshot at all"),
        ("truncated", good[: len(good) // 2]),
        ("header only", good[:40]),
        ("one byte short", good[:-1]),
        ("one byte flipped", bytes(flipped)),
        ("one byte more", good + b"\0"),
    ]:
        answer = two.load(bad)
        assert answer.status == 400, (name, answer)
        assert answer.error == "invalid", (name, answer)
        assert two.phase() == "standby", name
    # Nothing was kept: resuming now is refused.
    assert two.resume().status == 409

    assert two.load(good).status == 204
    # A bad snapshot after a good one leaves the good one loaded.
    assert two.load(good[:-7]).status == 400
    assert counter.orch.commit_move(first, good) == second
    assert two.resume().status == 204
    counter.wait_count(moved_at + 10)
    two.stop()
    one.stop()
    messages = counter.broker.drain()
    check_sequence(messages)
    check_bodies(messages)


def test_a_snapshot_of_an_older_epoch_is_refused(counter) -> None:
    # Epoch 1 counts and hands over to epoch 2, which counts and hands over to epoch 3.
    e1 = counter.orch.claim()
    one = counter.start("one", e1)
    counter.wait_count(5)
    e2 = counter.orch.claim_standby()
    two = counter.start("two", e2, mode="standby")
    two.wait_phase("standby")
    assert one.freeze().status == 200
    snap1 = one.fetch()
    assert two.load(snap1).status == 204
    counter.orch.commit_move(e1, snap1)
    assert two.resume().status == 204
    at = counter.broker.count()
    counter.wait_count(at + 5)
    assert two.freeze().status == 200
    snap2 = two.fetch()

    e3 = counter.orch.claim_standby()
    three = counter.start("three", e3, mode="standby")
    three.wait_phase("standby")
    assert three.load(snap2).status == 204
    older = three.load(snap1)
    assert older.status == 400, older
    assert older.error == "invalid", older
    assert "not newer" in older.json()["message"], older

    # An instance takes only snapshots of epochs before its own.
    again = counter.start("two-again", e2, mode="standby")
    again.wait_phase("standby")
    own = again.load(snap2)
    assert own.status == 400 and "not older" in own.json()["message"], own
    newer = counter.start("one-again", e1, mode="standby")
    newer.wait_phase("standby")
    assert newer.load(snap2).status == 400

    # The one loaded is the one that runs: epoch 3 continues after epoch 2.
    counter.orch.commit_move(e2, snap2)
    assert three.resume().status == 204
    moved_at = int(two.health()["sequence"])
    counter.wait_count(moved_at + 5)
    for i in (three, two, one):
        i.stop()
    messages = counter.broker.drain()
    check_sequence(messages)
    assert {m.epoch for m in messages} == {e1, e2, e3}


def test_freeze_times_out_on_a_processor_stuck_in_user_code(counter) -> None:
    # Each count is followed by 2 s in user code: the Rust counter sleeps inside its step,
    # the Python one spins in a busy loop holding the interpreter.
    config = counter.config(interval_ms=2000, spin=True)
    one = counter.start("one", counter.orch.claim(), config=config)
    counter.wait_count(1)
    # Just after a count, the processor is stuck for ~2 s: a 0.7 s freeze cannot reach a
    # safe point.
    started = time.monotonic()
    answer = one.freeze(timeout_ms=700)
    took = time.monotonic() - started
    assert answer.status == 504, answer
    assert answer.error == "timeout", answer
    assert took < 1.8, f"the freeze answered after {took:.1f}s"
    # Health does not wait for user code (nor for the interpreter).
    started = time.monotonic()
    assert one.phase() == "running"
    assert time.monotonic() - started < 0.5
    # The withdrawn freeze leaves it running: it counts on.
    counter.wait_count(2, within=10)
    assert one.phase() == "running"
    # A freeze that waits long enough succeeds, and resume continues the count.
    assert one.freeze(timeout_ms=8000).status == 200
    assert one.phase() == "frozen"
    frozen_at = counter.broker.count()
    assert one.resume().status == 204
    counter.wait_count(frozen_at + 1, within=10)
    code, line = one.stop()
    assert code == 0, line
    messages = counter.broker.drain()
    check_sequence(messages)
    assert len(messages) >= 3
    assert all(m.epoch == 1 for m in messages)


def test_freeze_request_without_a_safe_point_reports_readiness(counter) -> None:
    """A freeze on a standby instance (no run loop to stop) is a conflict, not a hang."""
    counter.orch.claim()
    standby = counter.start("standby", counter.orch.claim_standby(), mode="standby")
    standby.wait_phase("standby")
    answer = standby.freeze(timeout_ms=1000)
    assert answer.status == 409, answer
    assert standby.request("GET", "/state").status == 409
    eventually("standby readiness", 5, lambda: standby.request("GET", "/readyz", token=None).status == 200)
