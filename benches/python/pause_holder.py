"""The Python processor of the move-pause bench (``benches/benches/pause.rs``).

Holds ``size`` random bytes (``DORY_CONFIG``: ``{"size": n}``) and steps every millisecond
(``ctx.sleep``, a safe point), never publishing. The monotonic time of its last step is part
of its state, so it travels with the snapshot: the instance it moves to prints the pause the
processor saw, from its last step on the old instance to its first on the new one
(``CLOCK_MONOTONIC`` is one clock for every process on the machine), as
``resumed after <seconds>``. A first start prints ``stepping``.
"""

import os
import time

import dory


class Holder(dory.BaseProcessor):
    """A blob of bytes and the time of the last step."""

    blob: bytes = b""
    last_step: float = 0.0

    async def run(self, ctx: dory.Context) -> None:
        if self.last_step:
            print(f"resumed after {time.monotonic() - self.last_step:.9f}", flush=True)
        else:
            self.blob = os.urandom(int(ctx.config["size"]))
            print("stepping", flush=True)
        while True:
            self.last_step = time.monotonic()
            await ctx.sleep(0.001)
