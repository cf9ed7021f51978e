"""Python processors for the state tests (``tests/test_state.py``). Each one reports what it
finds by publishing text, so the test reads the outcome from the output queue.

``Everything`` holds one declared attribute of every supported type. Its first run fills
them, checkpoints and publishes ``filled``; a run that restores them publishes ``equal`` or
``differs: ...`` after comparing them, values and exact types, with :data:`EXPECTED`.
"""

import asyncio
import datetime
from typing import Any, Dict, List, Optional, Set, Tuple

import dory

UTC = datetime.timezone.utc

#: One value of every supported type, with the corner cases of each.
EXPECTED: Dict[str, Any] = {
    "none": None,
    "yes": True,
    "no": False,
    "small": -7,
    "big": 2**200 + 1,
    "negative_big": -(2**100),
    "u64_edge": 2**64 - 1,
    "real": 1.5e-300,
    "infinite": float("inf"),
    "text": "grüße, 世界 \u0000 end",
    "empty_text": "",
    "raw": bytes(range(256)),
    "items": [1, "two", [3.0, None], {"k": b"v"}],
    "pair": (1, ("nested", 2)),
    "empty_tuple": (),
    "mapping": {"a": 1, 2: "int key", (1, 2): "tuple key", None: [True]},
    "numbers": {1, 2, 3},
    "no_words": set(),
    "when": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC),
    "naive": datetime.datetime(1999, 12, 31, 12, 0),
    "offset": datetime.datetime(2020, 1, 1, 8, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
}


async def _idle(ctx: dory.Context) -> None:
    """Waits at a safe point for ever (``asyncio.sleep`` alone never reaches one, so a
    freeze or a SIGTERM would wait for it in vain)."""
    while True:
        await ctx.sleep(0.05)


def _same(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, datetime.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    return bool(a == b)


class Everything(dory.BaseProcessor):
    """Round trip of every supported type through a checkpoint and a restore."""

    filled: bool = False
    none: Any = "not yet"
    yes: bool = False
    no: bool = True
    small: int = 0
    big: int = 0
    negative_big: int = 0
    u64_edge: int = 0
    real: float = 0.0
    infinite: float = 0.0
    text: str = "x"
    empty_text: str = "x"
    raw: bytes = b""
    items: List[Any] = []
    pair: Tuple[Any, ...] = ()
    empty_tuple: Tuple[Any, ...] = (1,)
    mapping: Dict[Any, Any] = {}
    numbers: Set[int] = set()
    no_words: Set[str] = {"x"}
    when: Optional[datetime.datetime] = None
    naive: Optional[datetime.datetime] = None
    offset: Optional[datetime.datetime] = None

    async def run(self, ctx: dory.Context) -> None:
        if not self.filled:
            for name, value in EXPECTED.items():
                setattr(self, name, value)
            self.filled = True
            await ctx.checkpoint()
            await ctx.publish(b"filled")
        else:
            wrong = [
                f"{name}={getattr(self, name)!r} ({type(getattr(self, name)).__name__})"
                for name, value in EXPECTED.items()
                if not _same(getattr(self, name), value)
            ]
            await ctx.publish(("differs: " + "; ".join(wrong)) if wrong else "equal")
        while True:
            await asyncio.sleep(0.05)
            await ctx.publish(b"tick")


class Opaque:
    """Not a plain value: the state codec must refuse it."""


class Unsupported(dory.BaseProcessor):
    """A declared attribute holding an object the codec cannot save."""

    fine: int = 1
    thing: Any = None

    async def run(self, ctx: dory.Context) -> None:
        # While an attribute cannot be saved, no checkpoint is stored and nothing may be
        # published (the runtime never runs ahead of committed state): each error is put
        # right before it is reported.
        for thing in (Opaque(), {"inner": [1, Opaque()]}):
            self.thing = thing
            try:
                await ctx.checkpoint()
            except dory.StateError as e:
                said = f"StateError: {e}"
            except Exception as e:  # anything else is the wrong error
                said = f"{type(e).__name__}: {e}"
            else:
                said = "checkpointed"
            self.thing = None
            await ctx.publish(said)
        await ctx.checkpoint()
        await ctx.publish(b"fixed")
        await _idle(ctx)


class Undeclared(dory.BaseProcessor):
    """Assigns an attribute it did not declare, many times: warned about once."""

    count: int = 0

    async def run(self, ctx: dory.Context) -> None:
        for i in range(20):
            self.scratch = i  # not state
            self.count += 1
            await ctx.publish(str(self.count))
        await ctx.publish(b"done")
        await _idle(ctx)


class OldShape(dory.BaseProcessor):
    """Version 1 of a processor's state: ``total``."""

    state_version = 1
    total: int = 0

    async def run(self, ctx: dory.Context) -> None:
        self.total = 41
        await ctx.checkpoint()
        await ctx.publish(b"saved v1")
        await _idle(ctx)


class NewShape(dory.BaseProcessor):
    """Version 2: ``total`` became ``amount`` (plus one), migrated from version 1."""

    state_version = 2
    amount: int = 0
    migrated_from: int = 0

    def migrate_state(self, version: int, state: Dict[str, Any]) -> Dict[str, Any]:
        if version == 1:
            return {"amount": state["total"] + 1, "migrated_from": version}
        return state

    async def run(self, ctx: dory.Context) -> None:
        await ctx.publish(f"migrated from {self.migrated_from} amount={self.amount}")
        await _idle(ctx)


class Finishes(dory.BaseProcessor):
    """Publishes three counts and returns from ``run``: the instance saves and exits 0."""

    count: int = 0

    async def run(self, ctx: dory.Context) -> None:
        while self.count < 3:
            n = self.count + 1
            await ctx.publish(str(n))
            self.count = n
