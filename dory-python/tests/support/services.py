"""The real servers: a Postgres schema of the test's own and a RabbitMQ exchange and queues of
the test's own, or a skip when a server is unreachable (a failure under ``CI=true``).

The database is ``DORY_TEST_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/test``), the broker ``DORY_TEST_AMQP_URL`` (default
``amqp://guest:guest@127.0.0.1:5672/%2f``), as for the Rust integration tests.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pika
import psycopg
import pytest

DATABASE_URL = os.environ.get("DORY_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("DORY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

_counter = itertools.count()


def unique(area: str) -> str:
    """A name unique to this test process and call: letters, digits and ``_``."""
    area = re.sub(r"[^a-z0-9_]", "_", area.lower())[:24]
    return f"{area}_{os.getpid()}_{next(_counter)}"


def in_ci() -> bool:
    """Whether this is a CI run, where a missing server fails instead of skipping."""
    return os.environ.get("CI") == "true"


def unavailable(what: str, problem: object) -> None:
    """Skips the test (fails it under ``CI=true``) because ``what`` cannot be reached."""
    message = f"{what} is unreachable ({problem})"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` appended to its query string."""
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


class Database:
    """A schema of the test database, dropped at teardown. The Dory tables in it are created
    by the first process that connects (the counter's ``claim``)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.url = DATABASE_URL
        #: What an instance and the orchestrator subcommands are given as ``DORY_STORE_URL``.
        self.instance_url = with_query(DATABASE_URL, schema=schema)

    def url_via(self, host: str, port: int) -> str:
        """The instance URL with the server address replaced by ``host:port`` (a proxy)."""
        return re.sub(r"@[^/]+/", f"@{host}:{port}/", self.instance_url, count=1)

    def query(self, sql: str, *args: Any) -> List[tuple]:
        """Runs ``sql`` in the schema and returns its rows."""
        with psycopg.connect(self.url, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            cursor = conn.execute(sql, args)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def ownership(self, processor: str) -> Optional[Dict[str, Any]]:
        """The processor's ownership row, as a dict, or ``None``."""
        rows = self.query(
            "SELECT owner, highest, committed_epoch, committed_seq FROM ownership WHERE processor = %s",
            processor,
        )
        if not rows:
            return None
        owner, highest, epoch, seq = rows[0]
        return {"owner": owner, "highest": highest, "committed": (epoch, seq) if epoch is not None else None}

    def drop(self) -> None:
        """Drops the schema (best effort)."""
        try:
            with psycopg.connect(self.url, connect_timeout=5, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        except psycopg.Error:
            pass


def database(test: str) -> Database:
    """A fresh schema, or a skip (a failure under CI) when the database is unreachable."""
    try:
        with psycopg.connect(DATABASE_URL, connect_timeout=5):
            pass
    except psycopg.Error as e:
        unavailable(f"PostgreSQL at {DATABASE_URL} (set DORY_TEST_DATABASE_URL)", e)
    return Database(f"dory_py_{unique(test)}")


@dataclass
class Received:
    """One message as the test reads it back from a queue."""

    processor: Optional[str]
    epoch: Optional[int]
    sequence: Optional[int]
    message_id: Optional[str]
    routing_key: str
    body: bytes
    redelivered: bool

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", "replace")


def _int(value: Any) -> Optional[int]:
    return int(value) if value is not None else None


class Broker:
    """The test's own connection to the broker: a topic exchange for processor output, with a
    queue bound to every key (``output``), and input queues on demand; all removed at
    teardown."""

    def __init__(self, test: str) -> None:
        self.url = AMQP_URL
        params = pika.URLParameters(AMQP_URL)
        # No heartbeats: the blocking connection only answers them when called, and a test
        # may wait longer than two heartbeat intervals between calls; the broker must not drop
        # the connection (and with it the exclusive queue) meanwhile.
        params.heartbeat = 0
        params.socket_timeout = 5
        params.blocked_connection_timeout = 30
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.exchange = f"dory-py-{unique(test)}"
        self.channel.exchange_declare(self.exchange, exchange_type="topic", auto_delete=True)
        self.output = f"{self.exchange}-out"
        self.channel.queue_declare(self.output, exclusive=True)
        self.channel.queue_bind(self.output, self.exchange, routing_key="#")
        self._inputs: List[str] = []

    def publisher_url(self, routing_key: Optional[str] = None) -> str:
        """``DORY_PUBLISHER_URL`` for a processor publishing into this test's exchange."""
        params = {"exchange": self.exchange}
        if routing_key is not None:
            params["routing_key"] = routing_key
        return with_query(self.url, **params)

    def input_queue(self, name: str) -> str:
        """Declares a durable input queue of this test (deleted at teardown): durable and not
        exclusive, because a processor process consumes it."""
        queue = f"{self.exchange}-{name}"
        self.channel.queue_declare(queue, durable=True)
        self._inputs.append(queue)
        return queue

    def input_url(self, queue: str, **params: str) -> str:
        """``DORY_INPUT_URL`` for a processor consuming ``queue``."""
        return with_query(self.url, queue=queue, **params)

    def send(
        self,
        queue: str,
        body: bytes,
        producer: Optional[str] = None,
        sequence: Optional[int] = None,
    ) -> None:
        """Publishes ``body`` to ``queue`` through the default exchange, with the origin
        headers of a Dory producer when ``producer`` and ``sequence`` are given."""
        headers = None
        if producer is not None and sequence is not None:
            headers = {"dory-processor": producer, "dory-sequence": sequence}
        self.channel.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(headers=headers, delivery_mode=2),
        )

    def count(self, queue: Optional[str] = None) -> int:
        """How many messages wait in ``queue`` (default: the output queue)."""
        ok = self.channel.queue_declare(queue or self.output, passive=True)
        return int(ok.method.message_count)

    def drain(self, queue: Optional[str] = None) -> List[Received]:
        """Takes every message waiting in ``queue`` (default: the output queue), in order."""
        got: List[Received] = []
        while True:
            method, properties, body = self.channel.basic_get(queue or self.output, auto_ack=True)
            if method is None:
                return got
            headers = properties.headers or {}
            processor = headers.get("dory-processor")
            if isinstance(processor, bytes):
                processor = processor.decode()
            got.append(
                Received(
                    processor=processor,
                    epoch=_int(headers.get("dory-epoch")),
                    sequence=_int(headers.get("dory-sequence")),
                    message_id=properties.message_id,
                    routing_key=method.routing_key,
                    body=body,
                    redelivered=bool(method.redelivered),
                )
            )

    def close(self) -> None:
        """Deletes the input queues and the exchange; closing the connection removes the
        exclusive output queue."""
        try:
            for queue in self._inputs:
                self.channel.queue_delete(queue)
            self.channel.exchange_delete(self.exchange)
        except pika.exceptions.AMQPError:
            pass
        try:
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass


def broker(test: str) -> Broker:
    """The test's broker objects, or a skip (a failure under CI) when RabbitMQ is
    unreachable."""
    try:
        return Broker(test)
    except pika.exceptions.AMQPConnectionError as e:
        unavailable(f"RabbitMQ at {AMQP_URL} (set DORY_TEST_AMQP_URL)", repr(e))
        raise AssertionError("unreachable")  # for type checkers: unavailable() does not return


def check_bodies(messages: List[Received]) -> None:
    """Asserts each counter message's body is its sequence (the count travels with the
    output sequence in every snapshot)."""
    wrong = [m for m in messages if m.text != str(m.sequence)]
    assert not wrong, f"{len(wrong)} of {len(messages)} bodies differ from their sequence, first: {wrong[:3]}"


def check_sequence(messages: List[Received], start: int = 1) -> None:
    """Asserts the messages carry sequences ``start, start+1, ...``: no gap, no duplicate."""
    for i, m in enumerate(messages):
        assert m.sequence == start + i, (
            f"sequence gap or duplicate at message {i}: expected {start + i}, got {m}"
        )
