"""Running a processor as one instance: ``dory.run`` and ``python -m dory run``."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from dory._dory import Host
from dory.context import Context, _resolve
from dory.processor import BaseProcessor

__all__ = ["load", "run"]

_log = logging.getLogger("dory")


def load(target: str) -> type[BaseProcessor]:
    """The processor class named by ``target``: ``package.module:Class`` or
    ``path/to/file.py:Class``."""
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"{target!r}: expected `package.module:Class` or `file.py:Class`")
    if module_name.endswith(".py"):
        path = Path(module_name)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseProcessor)):
        raise TypeError(f"{target!r} is not a dory.BaseProcessor subclass")
    return cls


def run(processor: type[BaseProcessor] | BaseProcessor) -> int:
    """Runs ``processor`` as the instance the ``DORY_*`` environment describes, until it is
    stopped (SIGTERM, a move, a fence) or its ``run`` returns; returns the exit code.

    Prints ``listening on <address>`` once the endpoints are served and ``exit: <how>`` at
    the end. An exception escaping ``run`` ends the instance like a crash: the traceback is
    logged, nothing is saved (the next start restores the last checkpoint) and the code is 1.
    """
    if isinstance(processor, type):
        processor = processor()
    try:
        return asyncio.run(_serve(processor))
    finally:
        # No runtime thread may touch Python once the interpreter begins to shut down.
        Host.shutdown()


async def _serve(processor: BaseProcessor) -> int:
    loop = asyncio.get_running_loop()
    bound: asyncio.Future[str] = loop.create_future()
    started: asyncio.Future[None] = loop.create_future()
    exited: asyncio.Future[tuple[int, str]] = loop.create_future()
    host = Host.start(processor, loop, _resolve, bound, started, exited)
    try:
        address = await _first(bound, exited)
    except Exception as error:  # the backends could not be reached, the port not bound
        print(f"exit: failed {error}", flush=True)
        _log.error("cannot start: %s", error)
        return 1
    if address is not None:
        print(f"listening on {address}", flush=True)
    await _first(started, exited)
    task: asyncio.Task[None] | None = None
    if not exited.done():
        ctx = Context(host)
        object.__setattr__(processor, "_dory_running", True)
        task = asyncio.create_task(processor.run(ctx), name="dory processor run")
        waited: set[asyncio.Future[Any]] = {task, exited}
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not exited.done():
            crash = task.exception() if not task.cancelled() else None
            if crash is not None:
                _log.error(
                    "%s.run raised; stopping without saving:\n%s",
                    type(processor).__qualname__,
                    "".join(traceback.format_exception(crash)),
                )
                print(f"exit: crashed {type(crash).__qualname__}: {crash}", flush=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            host.finish()
    try:
        code, how = await exited
    except Exception as error:
        print(f"exit: failed {error}", flush=True)
        return 1
    finally:
        if task is not None and not task.done():
            task.cancel()
    print(f"exit: {how}", flush=True)
    return code


async def _first(wanted: asyncio.Future[Any], exited: asyncio.Future[Any]) -> Any:
    """``wanted``'s result, or ``None`` when the instance exited first."""
    waited: set[asyncio.Future[Any]] = {wanted, exited}
    await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    if wanted.done():
        return wanted.result()
    return None
