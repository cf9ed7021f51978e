"""``temperature``: a Dory processor in Python that watches a simulated temperature sensor
and publishes its running statistics.

State: ``step`` (readings taken so far), ``total`` (their sum) and ``window`` (the last ten
readings). Each reading is a pure function of the step number, so a replacement that
continues from the handed-over state produces exactly the output the old instance would
have: a move that lost or repeated a step shows as a gap or a repeat in ``step``.

Output (``DORY_PUBLISHER_URL``): one JSON object per reading, e.g.
``{"step": 42, "reading": 21.3, "mean": 20.9, "window_mean": 21.1}``.

``DORY_CONFIG`` (optional): ``{"interval": 0.2}``, seconds between readings (default 0.2).

Run it with ``python -m dory run temperature:Temperature`` (this directory on
``PYTHONPATH``); the README's first command runs it under the orchestrator.
"""

from __future__ import annotations

import json
import math
from typing import List

import dory


def reading(step: int) -> float:
    """The sensor's reading at ``step``: a slow daily wave plus a fast wobble, to 0.1 °C."""
    return round(20.0 + 3.0 * math.sin(step / 50.0) + 0.5 * math.sin(step * 1.7), 1)


class Temperature(dory.BaseProcessor):
    """Keeps running statistics of the sensor's readings."""

    state_version = 1
    #: Readings taken so far.
    step: int = 0
    #: The sum of every reading.
    total: float = 0.0
    #: The last ten readings, oldest first.
    window: List[float] = []

    async def run(self, ctx: dory.Context) -> None:
        interval = float((ctx.config or {}).get("interval", 0.2))
        while True:
            value = reading(self.step + 1)
            window = (self.window + [value])[-10:]
            total = self.total + value
            step = self.step + 1
            # Publish first, change the state after: an instance taking over at this `await`
            # (a safe point) has the state without this reading and publishes it again with
            # the same sequence.
            await ctx.publish(
                json.dumps(
                    {
                        "step": step,
                        "reading": value,
                        "mean": round(total / step, 3),
                        "window_mean": round(sum(window) / len(window), 3),
                    }
                )
            )
            self.step, self.total, self.window = step, total, window
            await ctx.sleep(interval)
