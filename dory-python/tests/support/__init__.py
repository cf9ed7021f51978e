"""Helpers of the pytest suite: the real servers (:mod:`.services`), processor processes and
their control endpoints (:mod:`.instance`), the orchestrator's part played by the counter
example's subcommands (:mod:`.orchestrator`) and a TCP proxy that can cut a connection
(:mod:`.proxy`)."""

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def eventually(what: str, within: float, check: Callable[[], Optional[T]], every: float = 0.02) -> T:
    """Polls ``check`` until it returns something other than ``None`` (or ``False``) and
    returns that; fails the test naming ``what`` once ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(every)
