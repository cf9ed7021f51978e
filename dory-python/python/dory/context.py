"""`Context`: what a processor's ``run`` is given, and the input `Message`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dory._dory import Host

__all__ = ["Context", "Message"]


@dataclass(frozen=True)
class Message:
    """One input message."""

    #: The message body.
    payload: bytes
    #: The routing key it was published with.
    routing_key: str | None
    #: The broker delivered it before (to this or an earlier instance).
    redelivered: bool
    #: The Dory processor that published it, when it came from one.
    producer: str | None
    #: Its output sequence at that producer; with ``producer``, what duplicates are found by.
    sequence: int | None


class Context:
    """The runtime, as a processor's ``run`` sees it.

    Every ``await`` on it is a **safe point**: between two of them your code runs
    undisturbed; at one of them the runtime may checkpoint the state, or freeze it and hand
    it over to the instance replacing this one. Keep the stretches between them short.
    """

    def __init__(self, host: Host) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        config = json.loads(host.config_json)
        self._config = config

    @property
    def processor_id(self) -> str:
        """The processor's id."""
        return self._host.processor_id

    @property
    def epoch(self) -> int:
        """This instance's epoch: one up with every start or move of the processor."""
        return self._host.epoch

    @property
    def sequence(self) -> int:
        """The sequence of the last message published; it continues across moves."""
        return self._host.sequence

    @property
    def config(self) -> Any:
        """The processor's configuration (``DORY_CONFIG`` parsed as JSON; ``None`` if unset)."""
        return self._config

    async def publish(self, payload: bytes | str, routing_key: str | None = None) -> int:
        """Publishes ``payload`` (``str`` is sent as UTF-8) and waits for the broker's
        confirmation; returns its sequence number.

        While the instance cannot publish (its lease cannot be renewed, the broker is away)
        this waits and tries again with the same sequence. Once another instance owns the
        processor, nothing more is published: the instance stops (exit code 3). Raises
        :class:`dory.InvalidError` when the broker refuses the message (no queue bound to
        its routing key, say).
        """
        if isinstance(payload, str):
            payload = payload.encode()
        future = self._loop.create_future()
        self._host.publish(bytes(payload), routing_key, future)
        return int(await future)

    async def checkpoint(self) -> None:
        """Asks for a checkpoint now, besides the periodic ones; raises
        :class:`dory.StateError` when an attribute holds a value that cannot be saved."""
        future = self._loop.create_future()
        self._host.checkpoint(future)
        await future

    async def sleep(self, seconds: float) -> None:
        """Sleeps like :func:`asyncio.sleep`, at a safe point: a freeze or a shutdown does
        not wait for the sleep to end (it resumes where it was after a move)."""
        future = self._loop.create_future()
        self._host.sleep(float(seconds), future)
        await future

    async def inputs(self) -> AsyncIterator[Message]:
        """The input messages (``DORY_INPUT_URL``), each once into the state: messages the
        state already holds (redelivered after a restart or a move) are skipped. A message
        is acknowledged to the broker only after a checkpoint holding its effect committed.
        """
        while True:
            future = self._loop.create_future()
            self._host.next_message(future)
            payload, routing_key, redelivered, producer, sequence = await future
            yield Message(payload, routing_key, redelivered, producer, sequence)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Settles ``future`` on its loop; called by the native runtime."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
