"""Dory processors in Python.

Subclass :class:`BaseProcessor`, declare the state as annotated class attributes with
defaults, implement ``async def run(self, ctx)``, and start it with
``python -m dory run package.module:Class``. The runtime underneath is Dory's Rust runtime:
it serves health, metrics and the state endpoints on port 8080, checkpoints the declared
state, saves it on SIGTERM, restores it on start, and hands it over when the orchestrator
moves the processor.
"""

from dory._dory import (
    ConflictError,
    DoryError,
    FencedError,
    InvalidError,
    NotFoundError,
    StateError,
    UnavailableError,
    decode_state,
    encode_state,
)
from dory._runner import run
from dory.context import Context, Message
from dory.processor import BaseProcessor
from dory.subscriber import Deduplicator, MessageId, parse_message_id

__all__ = [
    "BaseProcessor",
    "ConflictError",
    "Context",
    "Deduplicator",
    "DoryError",
    "FencedError",
    "InvalidError",
    "Message",
    "MessageId",
    "NotFoundError",
    "StateError",
    "UnavailableError",
    "decode_state",
    "encode_state",
    "parse_message_id",
    "run",
]
