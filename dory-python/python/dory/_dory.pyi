"""The native half of ``dory``: the bridge to Dory's Rust runtime, the CBOR codec of Python
state, and the exception classes. Processor authors import ``dory``."""

import asyncio
from collections.abc import Callable
from typing import Any, Final, final

__all__ = [
    "ConflictError",
    "DoryError",
    "FencedError",
    "Host",
    "InvalidError",
    "MAX_DEPTH",
    "NotFoundError",
    "StateError",
    "UnavailableError",
    "decode_state",
    "encode_state",
]

#: How deeply state values may nest.
MAX_DEPTH: Final[int]

class DoryError(Exception):
    """Every error Dory raises: catch this one for all of them."""

class FencedError(DoryError):
    """This instance is no longer entitled to write: another epoch owns the processor."""

class NotFoundError(DoryError):
    """The thing asked for does not exist."""

class ConflictError(DoryError):
    """A concurrent change won; read again and decide again."""

class UnavailableError(DoryError):
    """A backend could not be reached or did not answer in time; retryable."""

class InvalidError(DoryError):
    """Malformed input: a bad setting, a corrupt snapshot, an oversized body."""

class StateError(InvalidError):
    """The processor's state cannot be saved or restored."""

def encode_state(version: int, state: dict[str, Any]) -> bytes:
    """Encodes ``state`` at ``version`` as the CBOR document a snapshot holds."""

def decode_state(data: bytes) -> tuple[int, dict[str, Any]]:
    """Decodes a CBOR state document into ``(version, state)``."""

@final
class Host:
    """A running instance of a Python processor (made by ``dory.run``)."""

    @staticmethod
    def start(
        processor: Any,
        event_loop: asyncio.AbstractEventLoop,
        resolve: Callable[[asyncio.Future[Any], Any, BaseException | None], None],
        bound: asyncio.Future[str],
        started: asyncio.Future[None],
        exited: asyncio.Future[tuple[int, str]],
    ) -> Host: ...
    def publish(
        self, payload: bytes, routing_key: str | None, future: asyncio.Future[int]
    ) -> None: ...
    def checkpoint(self, future: asyncio.Future[None]) -> None: ...
    def next_message(
        self,
        future: asyncio.Future[tuple[bytes, str | None, bool, str | None, int | None]],
    ) -> None: ...
    def sleep(self, seconds: float, future: asyncio.Future[None]) -> None: ...
    def finish(self) -> None: ...
    @staticmethod
    def shutdown() -> None: ...
    @property
    def processor_id(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    @property
    def sequence(self) -> int: ...
    @property
    def config_json(self) -> str: ...
