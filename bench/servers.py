"""Server processes for the benchmarks: start, wait until ready, stop, and their memory.

Used by ``serve.py``, ``http.py`` and ``stall.py``: each starts ``llamabox serve`` and
``llama-server`` side by side with the same flags.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from common import RESULTS_DIR, log

SERVERS = ("llamabox", "llama-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (granian runs its worker in a child process)."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Peak resident memory of a process tree, sampled on a thread while active."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pids = tree_pids(pid)
        self._last_tree = time.monotonic()

    def sample(self) -> int:
        if time.monotonic() - self._last_tree > 2.0:  # refresh the tree now and then
            self._pids = tree_pids(self.pid)
            self._last_tree = time.monotonic()
        value = rss_bytes(self._pids)
        self.peak = max(self.peak, value)
        return value

    def __enter__(self) -> RssSampler:
        self.peak = 0
        self._stop.clear()
        self._pids = tree_pids(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None  # None: started by someone else (--llamabox-url)
    log_path: Path | None = None
    rss_idle: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def start_server(name: str, cmd: list[str], port: int, tag: str) -> Server:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS_DIR / f"{name}-{tag}.log"
    log(f"starting {name}: {' '.join(cmd)} (log: {log_path})")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Server(name=name, url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)


async def wait_ready(server: Server, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.proc is not None and server.proc.poll() is not None:
                tail = (
                    server.log_path.read_text(errors="replace")[-3000:] if server.log_path else ""
                )
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode} while starting:\n{tail}"
                )
            try:
                r = await client.get(server.url + "/health")
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s at {server.url}/health")


def stop_server(server: Server) -> None:
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log(f"{server.name} ignored SIGTERM for 30 s: killing pid {proc.pid}")
        proc.kill()
        proc.wait()


def pair_commands(
    llama_server: Path,
    common: list[str],
    ports: dict[str, int],
    llamabox_args: str = "",
    llama_server_args: str = "",
) -> dict[str, list[str]]:
    """The command lines of both servers with the same ``common`` flags (model, slots, ...)."""
    cmds = {
        "llamabox": [sys.executable, "-m", "llamabox", "serve", *common]
        + ["--host", "127.0.0.1", "--port", str(ports["llamabox"])],
        "llama-server": [str(llama_server), *common]
        + ["--host", "127.0.0.1", "--port", str(ports["llama-server"])]
        + ["--no-webui"],
    }
    cmds["llamabox"] += shlex.split(llamabox_args)
    cmds["llama-server"] += shlex.split(llama_server_args)
    return cmds


async def start_both(
    cmds: dict[str, list[str]], ports: dict[str, int], tag: str
) -> dict[str, Server]:
    """Both servers started and ready (stopped again if either fails to start)."""
    servers: dict[str, Server] = {}
    try:
        for name in SERVERS:
            servers[name] = start_server(name, cmds[name], ports[name], tag)
        for server in servers.values():
            await wait_ready(server)
    except BaseException:
        for server in servers.values():
            stop_server(server)
        raise
    return servers
