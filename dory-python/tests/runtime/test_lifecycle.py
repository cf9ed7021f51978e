"""An instance's life against the real store, Rust and Python: SIGTERM saves and the next
start restores from Postgres; a fenced instance stops publishing; an instance that cannot
renew its lease (the store cut off) stops publishing within its lease period."""

import time

from support import eventually
from support.proxy import Proxy
from support.services import check_bodies, check_sequence


def test_sigterm_saves_and_the_next_start_restores(counter) -> None:
    first = counter.orch.claim()
    one = counter.start("one", first)
    counter.wait_count(15)
    code, line = one.stop()
    assert code == 0, line
    assert line.startswith("saved sequence="), line
    saved = int(line.split("=")[1])
    row = counter.db.ownership(counter.processor)
    assert row is not None and row["committed"] == (first, saved), row
    stopped_at = counter.broker.count()

    # The next start (a fresh claim waits for the previous lease) restores from Postgres.
    second = counter.orch.claim()
    assert second == first + 1
    two = counter.start("two", second)
    counter.wait_count(stopped_at + 15)
    code, line = two.stop()
    assert code == 0, line

    messages = counter.broker.drain()
    check_sequence(messages)
    check_bodies(messages)
    assert [m.epoch for m in messages[:stopped_at]] == [first] * stopped_at
    assert {m.epoch for m in messages[stopped_at:]} == {second}


def test_a_fenced_instance_stops_publishing(counter) -> None:
    first = counter.orch.claim()
    one = counter.start("one", first)
    counter.wait_count(10)
    # Behind its back: a newer epoch is claimed and ownership moves to it with the latest
    # committed checkpoint.
    counter.orch.claim_standby()
    fenced_at = time.monotonic()
    counter.orch.commit_latest(first)

    # The instance learns it at its next store write (heartbeat every lease/3, checkpoint
    # every 200 ms) and stops publishing; readiness says why.
    ready = eventually(
        "the instance to report itself fenced",
        10,
        lambda: (lambda a: a if a.status == 412 else None)(
            one.request("GET", "/readyz", token=None)
        ),
    )
    assert ready.error == "fenced", ready
    assert time.monotonic() - fenced_at < 3, "fenced within a lease period"
    settled = counter.broker.count()
    time.sleep(1)
    assert counter.broker.count() == settled, "a fenced instance published"
    # It refuses to freeze or resume, and exits 3 on SIGTERM without saving.
    assert one.freeze(timeout_ms=1000).status == 412
    assert one.resume().status == 412
    code, line = one.stop()
    assert code == 3, line
    assert line.startswith("fenced"), line
    row = counter.db.ownership(counter.processor)
    assert row is not None and row["owner"] == first + 1, row
    check_sequence(counter.broker.drain())


def test_an_instance_cut_off_from_its_store_stops_within_its_lease(counter) -> None:
    lease_ms = 2000
    proxy = Proxy(("127.0.0.1", 5432))
    try:
        first = counter.orch.claim()
        one = counter.start(
            "one", first, store_url=counter.db.url_via("127.0.0.1", proxy.port), lease_ms=lease_ms
        )
        counter.wait_count(10)
        proxy.cut()
        cut_at = time.monotonic()
        # Within its lease it stops publishing by itself (checkpoints and renewals fail).
        time.sleep(lease_ms / 1000 + 0.5)
        stopped = counter.broker.count()
        ready = one.request("GET", "/readyz", token=None)
        assert ready.status == 503, ready
        time.sleep(1.5)
        assert counter.broker.count() == stopped, (
            f"still publishing {time.monotonic() - cut_at:.1f}s after the store was cut off"
        )
        assert one.phase() == "running", "it froze itself in place, it did not exit"

        # The store comes back, nobody else took over: it renews and counts on, no gap.
        proxy.restore()
        counter.wait_count(stopped + 10, within=30)
        code, line = one.stop()
        assert code == 0, line
    finally:
        proxy.close()
    messages = counter.broker.drain()
    check_sequence(messages)
    check_bodies(messages)
