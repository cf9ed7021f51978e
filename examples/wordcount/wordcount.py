"""``wordcount``: a Dory processor in Python that reads text from RabbitMQ and publishes the
running count of every word it sees.

State: ``counts``, the number of times each word was seen so far. It is checkpointed to the
state store, handed over when the processor moves and restored when it restarts, and every
input message is folded into it exactly once (``ctx.inputs()`` skips redelivered messages the
state already holds; input is acknowledged to the broker only after a checkpoint).

Input (``DORY_INPUT_URL``, ``amqp://…?queue=words``): messages whose body is UTF-8 text.
Output (``DORY_PUBLISHER_URL``): for each input message with words in it, one JSON object
with the running count of each of its words, e.g. ``{"be": 2, "not": 1, "or": 1, "to": 2}``
for ``to be or not to be``. Words are lower-cased runs of letters, digits, ``'`` and ``-``.

``DORY_CONFIG`` (optional): ``{"routing_key": "…"}`` for the output (default: the
publisher's).

Run it with ``python -m dory run wordcount:WordCount`` (this directory on ``PYTHONPATH``);
see README.md.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List

import dory

WORD = re.compile(r"[\w'-]+")


def words(text: str) -> List[str]:
    """The words of ``text``, lower-cased, in order."""
    return [w.strip("'-") for w in WORD.findall(text.lower()) if w.strip("'-")]


class WordCount(dory.BaseProcessor):
    """Counts words from the input and publishes the running counts."""

    state_version = 1
    #: How many times each word was seen.
    counts: Dict[str, int] = {}

    async def run(self, ctx: dory.Context) -> None:
        routing_key = (ctx.config or {}).get("routing_key")
        async for message in ctx.inputs():
            seen = words(message.payload.decode("utf-8", "replace"))
            if not seen:
                continue
            updated: Dict[str, int] = {}
            for word in seen:
                updated[word] = updated.get(word, self.counts.get(word, 0)) + 1
            # Publish first, change the state after: at the `await` (a safe point) the state
            # does not hold this message yet, so an instance that takes over from there
            # processes it again and publishes the same counts with the same sequence.
            await ctx.publish(json.dumps(updated, sort_keys=True), routing_key=routing_key)
            self.counts.update(updated)
