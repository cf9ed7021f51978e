"""`BaseProcessor`: what a Dory processor written in Python subclasses."""

from __future__ import annotations

import copy
import logging
import typing
from typing import Any, ClassVar

from dory._dory import StateError

if typing.TYPE_CHECKING:
    from dory.context import Context

__all__ = ["BaseProcessor"]


class BaseProcessor:
    """A long-running processor whose state survives restarts and moves.

    Declare the state as annotated class attributes with defaults; only these are state::

        class Counter(dory.BaseProcessor):
            count: int = 0
            seen: set[str] = set()

            async def run(self, ctx: dory.Context) -> None:
                while True:
                    n = self.count + 1
                    await ctx.publish(str(n))    # publish first,
                    self.count = n               # then change the state
                    await ctx.sleep(0.1)

    Each instance gets its own copy of every default. State values are plain data: ``None``,
    ``bool``, ``int`` (any size), ``float``, ``str``, ``bytes``, ``list``, ``tuple``,
    ``dict``, ``set`` and ``datetime.datetime``, nested up to 128 levels. A declared attribute
    holding anything else (an object, a ``defaultdict``) fails the checkpoint with a
    :class:`dory.StateError` naming the attribute and the type: state is never dropped in
    silence. Attributes that are not declared are not saved; assigning one inside ``run``
    logs a warning once per attribute, so nobody mistakes it for state. Names starting with
    ``_`` and ``ClassVar`` annotations are never state.

    Every ``await`` on the context is a safe point, taken *before* the call is performed: a
    snapshot holds the state as it is at that ``await``, and a restored instance starts
    ``run`` again from the top with it. So publish first, then change the state. Between
    taking an input message and asking for the next there is no safe point.

    Change ``state_version`` when the state's shape changes, and implement
    :meth:`migrate_state` to bring older snapshots up to date.
    """

    #: The version of the state's shape; stored with every snapshot.
    state_version: ClassVar[int] = 1

    _dory_declared: ClassVar[tuple[str, ...]] = ()
    _dory_running: bool = False
    _dory_warned: set[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            if klass is BaseProcessor or not issubclass(klass, BaseProcessor):
                continue
            annotations = klass.__dict__.get("__annotations__", {})
            try:
                hints = typing.get_type_hints(klass)
            except Exception:  # an annotation naming something not importable here
                hints = {}
            for name, raw in annotations.items():
                hint = hints.get(name, raw)
                if name.startswith("_") or _is_classvar(hint):
                    continue
                if name not in klass.__dict__ and not any(
                    name in k.__dict__ for k in klass.__mro__[1:]
                ):
                    raise TypeError(
                        f"{cls.__qualname__}.{name}: a state attribute needs a default "
                        f"(`{name}: ... = <default>`)"
                    )
                declared[name] = None
        cls._dory_declared = tuple(declared)

    def __init__(self) -> None:
        object.__setattr__(self, "_dory_warned", set())
        for name in type(self)._dory_declared:
            object.__setattr__(self, name, copy.deepcopy(getattr(type(self), name)))

    @property
    def logger(self) -> logging.Logger:
        """A logger named after the processor class (``dory.processor.<Class>``)."""
        return logging.getLogger(f"dory.processor.{type(self).__qualname__}")

    async def run(self, ctx: Context) -> None:
        """The processor's loop. Every ``await`` on ``ctx`` is a safe point: a checkpoint or a
        freeze for a move happens there, never in the middle of your code."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement `async def run(self, ctx)`")

    def migrate_state(self, version: int, state: dict[str, Any]) -> dict[str, Any]:
        """Brings a state saved at an older ``version`` up to :attr:`state_version`.

        The default accepts only the current version. Attributes missing from the returned
        dict keep their defaults; unknown ones are ignored with a warning.
        """
        if version != self.state_version:
            raise StateError(
                f"{type(self).__qualname__}: the stored state has version {version}, this "
                f"class has state_version {self.state_version}; implement migrate_state"
            )
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            self._dory_running
            and not name.startswith("_")
            and name not in type(self)._dory_declared
            and name not in self._dory_warned
        ):
            self._dory_warned.add(name)
            self.logger.warning(
                "%s.%s is not declared state: it is not saved or moved; declare it on the "
                "class (`%s: <type> = <default>`) to keep it",
                type(self).__qualname__,
                name,
                name,
            )
        object.__setattr__(self, name, value)

    # Called by the native runtime.

    def _dory_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self)._dory_declared}

    def _dory_load(self, version: int, state: dict[str, Any]) -> None:
        if version != self.state_version:
            state = self.migrate_state(version, state)
            if not isinstance(state, dict):
                raise StateError(
                    f"{type(self).__qualname__}.migrate_state returned "
                    f"{type(state).__qualname__}, not a dict"
                )
        declared = type(self)._dory_declared
        for name, value in state.items():
            if name in declared:
                object.__setattr__(self, name, value)
            else:
                self.logger.warning(
                    "the stored state has %r, which %s does not declare: ignored",
                    name,
                    type(self).__qualname__,
                )


def _is_classvar(hint: Any) -> bool:
    if isinstance(hint, str):
        return hint.startswith(("ClassVar", "typing.ClassVar"))
    return hint is ClassVar or typing.get_origin(hint) is ClassVar
