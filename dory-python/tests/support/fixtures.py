"""The fixtures of the pytest suites that run real processes (``dory-python/tests`` and
``examples/wordcount/tests``; each ``conftest.py`` imports them all from here).

Each test gets a Postgres schema of its own (``db``), a RabbitMQ exchange and queues of its
own (``broker``) and a launcher that kills every process it started at teardown
(``launcher``; their output is printed when the test fails). ``kind`` parametrizes a test
over the Rust ``dory-example-counter`` and the Python counter (``processors/pycounter.py``)
where the point is the same; ``counter`` puts these together for one processor, and
``py_processor`` does the same for any Python processor.

A server that cannot be reached skips the tests that need it, and fails them under
``CI=true``; so does a missing ``dory`` wheel for the tests of Python processors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from . import eventually, services
from .instance import (
    Instance,
    Launch,
    Launcher,
    Orchestrator,
    counter_binary,
)

#: The lease of the tests' instances: short, so a claim after a crash waits little.
LEASE_MS = 2000
#: Their checkpoint interval.
CHECKPOINT_MS = 200


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Keeps each phase's report on the test item, so teardown knows whether it failed."""
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def python_dory_available() -> bool:
    """Whether the ``dory`` wheel (with its native module) is installed here."""
    try:
        return importlib.util.find_spec("dory._dory") is not None
    except ImportError:  # no `dory`, or its `__init__` cannot import the native module
        return False


def require_python_dory() -> None:
    """Skips the test (fails it under CI) when the ``dory`` wheel is not installed."""
    if not python_dory_available():
        message = "the dory wheel is not installed (bash dory-python/scripts/test-python.sh builds it)"
        if services.in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def counter_bin() -> Path:
    """The ``dory-example-counter`` binary (also the orchestrator's subcommands)."""
    return counter_binary()


@pytest.fixture
def db(request: pytest.FixtureRequest) -> Iterator[services.Database]:
    """A fresh Postgres schema, dropped at teardown."""
    database = services.database(request.node.name)
    yield database
    database.drop()


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[services.Broker]:
    """The test's exchange, output queue and input queues, removed at teardown."""
    b = services.broker(request.node.name)
    yield b
    b.close()


@pytest.fixture
def launcher(
    request: pytest.FixtureRequest, counter_bin: Path, tmp_path: Path
) -> Iterator[Launcher]:
    """Starts processor processes; kills what is left at teardown and prints their output
    when the test failed."""
    launched = Launcher(counter_bin, tmp_path)
    yield launched
    launched.kill_all()
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        print(launched.report())


@pytest.fixture(params=["rust", "python"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which counter runs: the Rust example binary or the Python one."""
    if request.param == "python":
        require_python_dory()
    return str(request.param)


class Counter:
    """One counter processor of a test: its store schema, exchange, orchestrator and the
    launches of its instances."""

    def __init__(
        self,
        kind: str,
        db: services.Database,
        broker: services.Broker,
        launcher: Launcher,
        counter_bin: Path,
        processor: str = "counter",
    ) -> None:
        self.kind = kind
        self.db = db
        self.broker = broker
        self.launcher = launcher
        self.processor = processor
        self.orch = Orchestrator(counter_bin, processor, db.instance_url, LEASE_MS)
        #: Every output message :meth:`wait_text` took from the queue, in order.
        self.received: List[services.Received] = []

    def config(self, interval_ms: int = 5, **python: Any) -> Dict[str, Any]:
        """``DORY_CONFIG`` of the counter; ``python`` keys go only to the Python counter
        (the Rust one refuses unknown keys), but for ``spin``, which both read."""
        config: Dict[str, Any] = {"interval_ms": interval_ms}
        if self.kind == "python":
            config.update(python)
        elif "spin" in python:
            config["spin"] = python["spin"]
        return config

    def launch(
        self,
        epoch: int,
        mode: str = "restore",
        config: Optional[Dict[str, Any]] = None,
        store_url: Optional[str] = None,
        spec: str = "pycounter:Counter",
        lease_ms: int = LEASE_MS,
        checkpoint_ms: int = CHECKPOINT_MS,
        input_url: Optional[str] = None,
    ) -> Launch:
        """The launch of one instance of this processor."""
        return Launch(
            kind=self.kind,
            processor=self.processor,
            epoch=epoch,
            mode=mode,
            store_url=store_url or self.db.instance_url,
            publisher_url=self.broker.publisher_url(),
            lease_ms=lease_ms,
            checkpoint_ms=checkpoint_ms,
            config=config if config is not None else self.config(),
            spec=spec,
            input_url=input_url,
        )

    def start(self, name: str, epoch: int, mode: str = "restore", **kw: Any) -> Instance:
        """Starts an instance and waits until it listens."""
        return self.launcher.start(name, self.launch(epoch, mode, **kw))

    def wait_count(self, at_least: int, within: float = 30) -> int:
        """Waits until the output queue holds ``at_least`` messages; returns how many."""
        return eventually(
            f"{at_least} messages in the output queue",
            within,
            lambda: (lambda n: n if n >= at_least else None)(self.broker.count()),
        )


    def wait_text(self, wanted: Callable[[str], bool], within: float = 30) -> services.Received:
        """Takes output messages (keeping them in :attr:`received`) until one's body
        satisfies ``wanted``; returns it."""
        def check() -> Optional[services.Received]:
            fresh = self.broker.drain()
            self.received += fresh
            return next((m for m in fresh if wanted(m.text)), None)

        found = next((m for m in self.received if wanted(m.text)), None)
        return found or eventually("an output message as wanted", within, check, every=0.05)


@pytest.fixture
def counter(
    kind: str,
    db: services.Database,
    broker: services.Broker,
    launcher: Launcher,
    counter_bin: Path,
) -> Counter:
    """A counter processor of the parametrized ``kind`` with its servers."""
    return Counter(kind, db, broker, launcher, counter_bin)


@pytest.fixture
def py_processor(
    db: services.Database,
    broker: services.Broker,
    launcher: Launcher,
    counter_bin: Path,
) -> Counter:
    """A Python processor (any class in ``processors/``: pass ``spec=``) with its servers."""
    require_python_dory()
    return Counter("python", db, broker, launcher, counter_bin, processor="pyproc")
