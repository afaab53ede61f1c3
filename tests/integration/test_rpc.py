"""Multi-host over ggml RPC on loopback: ``llamabox rpc-server`` plus ``serve --rpc``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server_fixtures import free_port, start_server

pytestmark = pytest.mark.integration

PROMPT = {"prompt": "The quick brown fox", "n_predict": 24, "temperature": 0, "cache_prompt": False}


@contextlib.contextmanager
def rpc_server(*flags: str) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    """``llamabox rpc-server --port PORT``, once it accepts connections."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="llamabox-rpc-", suffix=".log")[1])
    args = [sys.executable, "-m", "llamabox", "rpc-server", "--port", str(port), "-t", "1", *flags]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield port, proc, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def _tokens(url: str) -> list[int]:
    r = httpx.post(f"{url}/completion", json={**PROMPT, "return_tokens": True}, timeout=120)
    r.raise_for_status()
    return list(r.json()["tokens"])


def test_layers_on_an_rpc_server_give_the_local_greedy_output(tiny_model_path: Path) -> None:
    with start_server(tiny_model_path, "-c", "1024") as local:
        want = _tokens(local.base_url)
    with rpc_server() as (port, proc, log):
        with start_server(tiny_model_path, "-c", "1024", "--rpc", f"127.0.0.1:{port}") as remote:
            devices = httpx.get(f"{remote.base_url}/props").json()["system_info"]["devices"]
            assert [d["description"] for d in devices if d["name"].startswith("RPC")] == [
                f"127.0.0.1:{port}"
            ]
            assert _tokens(remote.base_url) == want
        assert "Accepted client connection" in log.read_text()  # the layers really went there
        assert proc.poll() is None  # the client leaving does not end the server


def test_an_unreachable_rpc_server_is_a_clear_start_error(tiny_model_path: Path) -> None:
    port = free_port()  # nothing listens there
    args = [sys.executable, "-m", "llamabox", "serve", "-m", str(tiny_model_path)]
    args += ["--port", str(free_port()), "--rpc", f"127.0.0.1:{port}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"cannot connect to the RPC server 127.0.0.1:{port}" in out.stderr + out.stdout
    out = subprocess.run([*args[:-1], "nonsense"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "host:port" in out.stderr + out.stdout


def test_an_rpc_server_going_away_fails_the_request_and_the_server_stays_up(
    tiny_model_path: Path,
) -> None:
    """ggml's RPC client cannot recover from a lost server: the request in flight gets an error,
    /health turns 503 and says why (a liveness probe then restarts the pod), later requests get
    a 503 with the same reason, and the server still answers and stops cleanly."""
    with rpc_server() as (port, proc, _):
        with start_server(tiny_model_path, "-c", "1024", "--rpc", f"127.0.0.1:{port}") as remote:
            _tokens(remote.base_url)
            assert httpx.get(f"{remote.base_url}/health").status_code == 200
            proc.kill()
            proc.wait(30)
            r = httpx.post(f"{remote.base_url}/completion", json=PROMPT, timeout=60)
            assert r.status_code == 503, r.text
            assert f"RPC server (--rpc 127.0.0.1:{port}) went away" in r.json()["error"]["message"]
            health = httpx.get(f"{remote.base_url}/health", timeout=10)
            assert health.status_code == 503
            assert "went away" in health.json()["error"]["message"]
            again = httpx.post(f"{remote.base_url}/v1/completions", json=PROMPT, timeout=10)
            assert again.status_code == 503 and "went away" in again.text
            assert httpx.get(f"{remote.base_url}/v1/models", timeout=10).status_code == 200
            # A streamed request gets a proper error too, never a hang.
            with httpx.stream(
                "POST",
                f"{remote.base_url}/v1/completions",
                json={**PROMPT, "stream": True},
                timeout=10,
            ) as s:
                assert s.status_code == 503
            assert remote.proc.poll() is None
            assert "a ggml RPC server (--rpc) went away" in remote.log()
        assert remote.proc.returncode == 0, remote.log()


def test_rpc_server_command_line() -> None:
    run = [sys.executable, "-m", "llamabox", "rpc-server"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--threads" in out.stdout and "--cache-dir" in out.stdout
    out = subprocess.run([*run, "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--port" in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [*run, "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in out.stderr
