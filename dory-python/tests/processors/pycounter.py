"""The Python twin of ``dory-example-counter``: counts 1, 2, 3, ... and publishes each count,
so that every message's body equals its ``dory-sequence`` header across checkpoints, restarts
and moves.

``DORY_CONFIG``: ``{"interval_ms": 100, "blocking": false, "spin": false}``. The pause after
each count is ``asyncio.sleep`` by default (the event loop stays free), ``time.sleep`` with
``blocking`` and a busy loop holding the interpreter with ``spin``: user code stuck between
two safe points, which a freeze must not wait for beyond its timeout.
"""

import asyncio
import time

import dory


class Counter(dory.BaseProcessor):
    """Publishes the next count, then counts it."""

    state_version = 1
    count: int = 0

    async def run(self, ctx: dory.Context) -> None:
        config = ctx.config or {}
        interval = config.get("interval_ms", 100) / 1000
        blocking = config.get("blocking", False)
        spin = config.get("spin", False)
        while True:
            n = self.count + 1
            # Only a confirmed publish advances the count. While the runtime may not publish
            # (lease not renewed, checkpoint not stored) it refuses with UnavailableError:
            # try the same count again. FencedError ends the run.
            try:
                await ctx.publish(str(n).encode(), routing_key=None)
            except dory.UnavailableError:
                await asyncio.sleep(0.1)
                continue
            self.count = n
            if spin:
                until = time.monotonic() + interval
                while time.monotonic() < until:
                    pass
            elif blocking:
                time.sleep(interval)
            else:
                await asyncio.sleep(interval)
