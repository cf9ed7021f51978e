"""``dory.BaseProcessor``'s state, through real processes: every supported type survives a
checkpoint and a restart, an unsupported value fails the checkpoint naming the attribute and
its type, an undeclared attribute is warned about once, and ``migrate_state`` brings an older
snapshot's state up to date. The processors are in ``processors/pystate.py``."""

import re

from support.fixtures import Counter


def test_every_supported_type_survives_a_checkpoint_and_a_restart(py_processor: Counter) -> None:
    p = py_processor
    one = p.start("one", p.orch.claim(), spec="pystate:Everything", config={})
    p.wait_text(lambda t: t == "filled")
    # The checkpoint committed before `filled` was published; a crash saves nothing more.
    assert one.metric("dory_checkpoints_total") >= 1
    one.kill()
    two = p.start("two", p.orch.claim(), spec="pystate:Everything", config={})
    verdict = p.wait_text(lambda t: t == "equal" or t.startswith("differs"))
    assert verdict.text == "equal", verdict.text
    code, line = two.stop()
    assert code == 0, line


def test_an_unsupported_value_fails_the_checkpoint_naming_attribute_and_type(py_processor: Counter) -> None:
    p = py_processor
    one = p.start("one", p.orch.claim(), spec="pystate:Unsupported", config={})
    # The processor publishes what each of its three checkpoints said.
    p.wait_text(lambda t: t == "fixed")
    first, nested, fixed = [m.text for m in p.received]
    for said in (first, nested):
        assert said.startswith("StateError: "), said
        assert "thing" in said and "Opaque" in said, said
    # Once the attribute holds a plain value again, checkpoints go through.
    assert fixed == "fixed"
    code, line = one.stop()
    assert code == 0 and line.startswith("saved"), line


def test_an_undeclared_attribute_is_warned_about_once(py_processor: Counter) -> None:
    p = py_processor
    one = p.start("one", p.orch.claim(), spec="pystate:Undeclared", config={})
    p.wait_text(lambda t: t == "done")
    one.stop()
    warnings = [line for line in one.stderr_text().splitlines() if "scratch" in line]
    assert len(warnings) == 1, warnings
    assert re.search(r"warn", warnings[0], re.IGNORECASE), warnings
    # `count` is declared: nothing is said about it.
    assert not [line for line in one.stderr_text().splitlines() if "Undeclared.count" in line]


def test_migrate_state_is_called_with_the_old_version(py_processor: Counter) -> None:
    p = py_processor
    old = p.start("old", p.orch.claim(), spec="pystate:OldShape", config={})
    p.wait_text(lambda t: t == "saved v1")
    code, line = old.stop()
    assert code == 0, line
    new = p.start("new", p.orch.claim(), spec="pystate:NewShape", config={})
    migrated = p.wait_text(lambda t: t.startswith("migrated"))
    assert migrated.text == "migrated from 1 amount=42", migrated.text
    code, line = new.stop()
    assert code == 0, line


def test_run_returning_saves_and_exits_cleanly(py_processor: Counter) -> None:
    p = py_processor
    one = p.start("one", p.orch.claim(), spec="pystate:Finishes", config={})
    code, line = one.exited()
    assert code == 0 and line.startswith("saved sequence="), line
    p.wait_text(lambda t: t == "3")
    assert [m.text for m in p.received] == ["1", "2", "3"]
    # Restored with count 3, the next start publishes nothing more and exits again.
    two = p.start("two", p.orch.claim(), spec="pystate:Finishes", config={})
    code, line = two.exited()
    assert code == 0 and line.startswith("saved"), line
    p.received += p.broker.drain()
    assert [m.text for m in p.received] == ["1", "2", "3"]
