"""Real ``llamabox serve`` processes on loopback, for the HTTP integration tests.

Fixtures (register them from ``tests/conftest.py``: ``from tests.integration.server_fixtures
import tiny_server, gemma_server``): ``tiny_server`` (the tiny random model, 4 slots, embeddings,
metrics, an API key, CORS for one origin) and ``gemma_server`` (the real default model). Both
are session-scoped; :func:`start_server` starts others (a context manager).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest

API_KEY = "test-key-123"
CORS_ORIGIN = "http://ok.example"
START_TIMEOUT = 120.0

# A server whose engine sleeps before loading: /health must answer 503 meanwhile.
_SLOW_LOAD_SCRIPT = """
import asyncio, sys
from llamabox.api.app import create_app
from llamabox.config import ServerConfig
from llamabox.engine import Engine
from llamabox.server import serve
from llamabox.types import EngineConfig

class SlowEngine(Engine):
    async def start(self):
        await asyncio.sleep(float(sys.argv[3]))
        await super().start()

config = ServerConfig(engine=EngineConfig(model=sys.argv[1], n_ctx=1024), port=int(sys.argv[2]))
asyncio.run(serve(config, create_app(config, SlowEngine(config.engine))))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A running server: its URL, key, process and log."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, key: str | None):
        self.proc = proc
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.api_key = key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or self.api_key or "none",
            max_retries=0,
            timeout=60,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        """Whether ``text`` shows up in the log in time (access lines follow the response)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _spawn(args: Sequence[str], port: int, key: str | None) -> ServerProcess:
    log = Path(tempfile.mkstemp(prefix="llamabox-server-", suffix=".log")[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in [n for n in env if n.startswith("LLAMA_ARG_") or n == "LLAMA_API_KEY"]:
        del env[name]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, port, log, key)


@contextlib.contextmanager
def start_server(
    model: str | Path | None, *flags: str, api_key: str | None = None, wait: bool = True
) -> Iterator[ServerProcess]:
    """``python -m llamabox serve -m MODEL --port PORT FLAGS`` (no -m when MODEL is None: the
    flags name the models); stopped (SIGTERM) on exit."""
    port = free_port()
    args = [sys.executable, "-m", "llamabox", "serve", "--port", str(port)]
    args += ["-m", str(model)] if model is not None else []
    args += ["--threads", "2", *flags]
    if api_key:
        args += ["--api-key", api_key]
    server = _spawn(args, port, api_key)
    try:
        if wait:
            server.wait_healthy()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def start_slow_loading_server(model: str | Path, delay: float) -> Iterator[ServerProcess]:
    """A server whose engine waits ``delay`` seconds before loading the model."""
    port = free_port()
    args = [sys.executable, "-c", _SLOW_LOAD_SCRIPT, str(model), str(port), str(delay)]
    server = _spawn(args, port, None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "4", "-c", "4096", "-a", "tiny", "--embeddings", "--pooling", "mean"]
    flags += ["--metrics", "--cors-origins", CORS_ORIGIN, "--max-body-size", "64K"]
    with start_server(tiny_model_path, *flags, api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="session")
def gemma_server(gemma_model_path: Path) -> Iterator[ServerProcess]:
    with start_server(gemma_model_path, "-np", "4", "-c", "8192", "-a", "gemma") as server:
        yield server
