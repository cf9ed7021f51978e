"""Processor processes: the Rust ``dory-example-counter`` binary and Python processors run
with ``python -m dory run module:Class``, started with an instance environment, read through
their stdout lines (``listening on <address>``, ``exit: ...``), driven through their control
endpoints, stopped with SIGTERM and always killed at teardown.

Also the orchestrator's part, played by the counter's subcommands (``claim``,
``claim --standby``, ``commit-move``): they work for Python processors too, because the
state store schema is shared.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import eventually

TESTS = Path(__file__).resolve().parent.parent
#: Python processors used by the tests live here (put on ``PYTHONPATH``).
PROCESSORS = TESTS / "processors"
REPO = TESTS.parent.parent


def counter_binary() -> Path:
    """The ``dory-example-counter`` binary: ``DORY_COUNTER_BIN``, or the debug build in
    ``CARGO_TARGET_DIR`` (built here when it is missing or stale)."""
    given = os.environ.get("DORY_COUNTER_BIN")
    if given:
        return Path(given)
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/dory/target"))
    subprocess.run(
        ["cargo", "build", "--quiet", "-p", "dory-example-counter"],
        cwd=REPO,
        env={**os.environ, "CARGO_TARGET_DIR": str(target)},
        check=True,
    )
    return target / "debug" / "dory-example-counter"


class Orchestrator:
    """The orchestrator's store writes for one processor, through the counter's
    subcommands."""

    def __init__(self, binary: Path, processor: str, store_url: str, lease_ms: int) -> None:
        self.binary = binary
        self.processor = processor
        self.store_url = store_url
        self.lease_ms = lease_ms

    def _run(self, *args: str, stdin: bytes = b"", timeout: float = 60) -> int:
        env = {
            **os.environ,
            "DORY_PROCESSOR_ID": self.processor,
            "DORY_STORE_URL": self.store_url,
            "DORY_LEASE_MS": str(self.lease_ms),
            "RUST_LOG": "warn",
        }
        done = subprocess.run(
            [str(self.binary), *args], input=stdin, env=env, capture_output=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"dory-example-counter {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace')}"
            )
        return int(done.stdout.decode().strip().splitlines()[-1])

    def claim(self) -> int:
        """Claims the next epoch and makes it the owner (waiting for the previous owner's
        lease); returns it, for an instance in ``restore`` mode."""
        return self._run("claim")

    def claim_standby(self) -> int:
        """Claims the next epoch without making it the owner; for a replacement in
        ``standby`` mode."""
        return self._run("claim", "--standby")

    def commit_move(self, from_epoch: int, snapshot: bytes, to_epoch: Optional[int] = None) -> int:
        """Commits a move from ``from_epoch`` with ``snapshot`` (what ``GET /state``
        answered); returns the new owner's epoch."""
        args = ["commit-move", "--from-epoch", str(from_epoch)]
        if to_epoch is not None:
            args += ["--to-epoch", str(to_epoch)]
        return self._run(*args, stdin=snapshot)

    def commit_latest(self, from_epoch: int, attempts: int = 10) -> int:
        """Moves ownership from ``from_epoch`` to the highest claimed epoch with the latest
        committed checkpoint, behind a running owner's back (retried: the owner may commit a
        newer checkpoint in between)."""
        for attempt in range(attempts):
            try:
                return self._run("commit-move", "--from-epoch", str(from_epoch), "--latest")
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")


@dataclass
class Answer:
    """An HTTP answer from an instance's endpoint."""

    status: int
    body: bytes
    #: Header names in lower case.
    headers: Dict[str, str]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @property
    def error(self) -> Optional[str]:
        """The ``error`` kind of an error body, if it is one."""
        try:
            return self.json().get("error")
        except (ValueError, AttributeError):
            return None


@dataclass
class Launch:
    """What an instance is started with."""

    kind: str  # "rust" or "python"
    processor: str
    epoch: int
    mode: str  # "restore" or "standby"
    store_url: str
    publisher_url: str
    lease_ms: int = 3000
    checkpoint_ms: int = 200
    config: Optional[Dict[str, Any]] = None
    #: For ``kind == "python"``: ``module:Class`` in :data:`PROCESSORS`.
    spec: str = "pycounter:Counter"
    input_url: Optional[str] = None
    extra_env: Dict[str, str] = field(default_factory=dict)


class Instance:
    """One processor process. Its stdout and stderr go to files in the test's temporary
    directory (shown when the test fails)."""

    def __init__(self, name: str, launch: Launch, binary: Path, logs: Path) -> None:
        self.name = name
        self.launch = launch
        self.token = f"token-{name}-{launch.epoch}"
        self.out_path = logs / f"{name}.stdout"
        self.err_path = logs / f"{name}.stderr"
        env = {
            **os.environ,
            "DORY_PROCESSOR_ID": launch.processor,
            "DORY_EPOCH": str(launch.epoch),
            "DORY_MODE": launch.mode,
            "DORY_TOKEN": self.token,
            "DORY_PORT": "0",
            "DORY_STORE_URL": launch.store_url,
            "DORY_PUBLISHER_URL": launch.publisher_url,
            "DORY_LEASE_MS": str(launch.lease_ms),
            "DORY_CHECKPOINT_INTERVAL_MS": str(launch.checkpoint_ms),
            "RUST_LOG": os.environ.get("RUST_LOG", "info"),
            "PYTHONUNBUFFERED": "1",
            **launch.extra_env,
        }
        if launch.config is not None:
            env["DORY_CONFIG"] = json.dumps(launch.config)
        if launch.input_url is not None:
            env["DORY_INPUT_URL"] = launch.input_url
        if launch.kind == "rust":
            argv = [str(binary)]
        elif launch.kind == "python":
            argv = [sys.executable, "-m", "dory", "run", launch.spec]
            path = [str(PROCESSORS), str(REPO / "examples/wordcount")]
            if env.get("PYTHONPATH"):
                path.append(env["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(path)
        else:
            raise ValueError(f"unknown processor kind {launch.kind!r}")
        self.argv = argv
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        self.port = 0

    # -- the process -------------------------------------------------------------------

    def stdout_lines(self) -> List[str]:
        """The stdout lines so far."""
        return self.out_path.read_text(errors="replace").splitlines()

    def stderr_text(self) -> str:
        """The stderr output so far."""
        return self.err_path.read_text(errors="replace")

    def line_after(self, prefix: str) -> Optional[str]:
        """The rest of the first stdout line starting with ``prefix``."""
        for line in self.stdout_lines():
            if line.startswith(prefix):
                return line[len(prefix):]
        return None

    def wait_listening(self, within: float = 30) -> "Instance":
        """Waits until the instance reports its address; fails if it exits first."""

        def check() -> Optional[str]:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.process.returncode} before listening:\n"
                    f"{self.stderr_text()[-4000:]}"
                )
            return self.line_after("listening on ")

        address = eventually(f"{self.name} to report its address", within, check)
        self.port = int(address.rsplit(":", 1)[1])
        return self

    def terminate(self) -> None:
        """Sends SIGTERM (the runtime owns it: freeze, save, flush, exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kills the process at once (a crash: nothing saved)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def exited(self, within: float = 30) -> Tuple[int, str]:
        """Waits for the process to exit; returns its exit code and its ``exit: ...`` line."""
        try:
            code = self.process.wait(within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {within}s") from None
        line = eventually(
            f"the exit line of {self.name}", 5, lambda: self.line_after("exit: ")
        )
        return code, line

    def stop(self) -> Tuple[int, str]:
        """SIGTERM, then :meth:`exited`."""
        self.terminate()
        return self.exited()

    # -- the endpoints -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        token: Optional[str] = "",
        headers: Optional[Dict[str, str]] = None,
        timeout: float = 30,
    ) -> Answer:
        """One HTTP request; ``token=""`` (default) sends this instance's token, ``None``
        none, anything else that token."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token or self.token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return Answer(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
        finally:
            conn.close()

    def health(self) -> Dict[str, Any]:
        """``GET /healthz``, with ``phase`` flattened to its name."""
        answer = self.request("GET", "/healthz", token=None, timeout=5)
        assert answer.status == 200, answer
        health = answer.json()
        phase = health.get("phase")
        if isinstance(phase, dict):
            health["phase"] = phase.get("phase")
        return dict(health)

    def phase(self) -> Optional[str]:
        """The phase ``/healthz`` reports, or ``None`` when it does not answer."""
        try:
            return str(self.health()["phase"])
        except (OSError, AssertionError, http.client.HTTPException):
            return None

    def wait_phase(self, phase: str, within: float = 30) -> None:
        """Waits until ``/healthz`` reports ``phase``."""
        eventually(f"{self.name} to be {phase}", within, lambda: self.phase() == phase)

    def metric(self, name: str) -> float:
        """One value from ``GET /metrics``."""
        text = self.request("GET", "/metrics", token=None, timeout=5).body.decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name} in:\n{text}")

    def freeze(self, timeout_ms: int = 5000) -> Answer:
        """``POST /state/freeze``."""
        return self.request(
            "POST",
            "/state/freeze",
            json.dumps({"timeout_ms": timeout_ms}).encode(),
            headers={"Content-Type": "application/json"},
            timeout=timeout_ms / 1000 + 10,
        )

    def fetch(self) -> bytes:
        """``GET /state``: the frozen snapshot."""
        answer = self.request("GET", "/state")
        assert answer.status == 200, f"fetch from {self.name}: {answer}"
        return answer.body

    def load(self, snapshot: bytes) -> Answer:
        """``PUT /state``."""
        return self.request(
            "PUT", "/state", snapshot, headers={"Content-Type": "application/octet-stream"}
        )

    def resume(self) -> Answer:
        """``POST /state/resume``."""
        return self.request("POST", "/state/resume")

    def declare_length(self, method: str, path: str, length: int) -> Answer:
        """Sends only the head of a request that declares a ``length``-byte body (which is
        never sent): how an instance answers a body over its limit without reading it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(
                (
                    f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {self.token}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
                ).encode()
            )
            response = http.client.HTTPResponse(s)
            response.begin()
            body = response.read(64 << 10)
            return Answer(response.status, body, {k.lower(): v for k, v in response.getheaders()})


class Launcher:
    """Starts instances for one test and kills whatever is left at teardown."""

    def __init__(self, binary: Path, logs: Path) -> None:
        self.binary = binary
        self.logs = logs
        self.instances: List[Instance] = []

    def start(self, name: str, launch: Launch, within: float = 30) -> Instance:
        """Starts an instance and waits until it listens."""
        instance = Instance(name, launch, self.binary, self.logs)
        self.instances.append(instance)
        return instance.wait_listening(within)

    def report(self) -> str:
        """Every instance's output, for a failed test."""
        parts = []
        for i in self.instances:
            parts.append(
                f"---- {i.name} ({' '.join(i.argv)}) exit={i.process.poll()} ----\n"
                f"stdout:\n{i.out_path.read_text(errors='replace')[-3000:]}\n"
                f"stderr:\n{i.stderr_text()[-6000:]}"
            )
        return "\n".join(parts)

    def kill_all(self) -> None:
        """Kills every instance still running."""
        for i in self.instances:
            try:
                i.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass
