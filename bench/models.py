"""Several models: one engine per model in the server's process, or one child server each?

llama-server's router spawns a child ``llama-server`` per model and forwards every request to
it over HTTP (a crashed model takes only its child down). llamabox keeps every engine in its one
process. What each way costs, measured here side by side:

- **load**: ``Engine.start()`` in this process, against a child ``llamabox serve -m MODEL``
  from its spawn until ``/health`` answers 200 (what a router waits for before it can forward);
- **memory**: the resident memory one more engine adds to this process, against a child's
  whole resident memory (its Python, granian, the module and the model), and a bare
  ``python -c "import llamabox._core"``;
- **the hop**: a short request's latency sent straight to a server, against the same request
  through a minimal asyncio reverse proxy (one kept-alive upstream connection per client
  connection, bytes relayed as they come: a floor for what a router's hop costs).

    python bench/models.py                     # Gemma 3 270M (the default model), 5 repeats
    python bench/models.py --tiny              # the tests' tiny random model instead
    python bench/models.py --model M.gguf --repeat 3 --requests 300

Blocks alternate (A B, then B A) on this shared machine; read the ratios. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import default_threads, log, median, model_path, percentile  # noqa: E402
from servers import free_port, rss_bytes, tree_pids  # noqa: E402

_BARE = (
    "import llamabox._core\n"
    "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')))"
)


def _self_rss() -> int:
    return rss_bytes([os.getpid()])


async def _load_in_process(model: Path, threads: int) -> tuple[float, int, int]:
    """Seconds Engine.start() takes, the resident memory the loaded engine adds, and what is
    left of it after an unload as the server does it (Engine.stop(), then trim_heap())."""
    from llamabox.api.models_registry import trim_heap
    from llamabox.engine import Engine
    from llamabox.types import EngineConfig

    engine = Engine(EngineConfig(model=str(model), n_ctx=2048, n_parallel=1, n_threads=threads))
    before = _self_rss()
    t0 = time.perf_counter()
    await engine.start()
    seconds = time.perf_counter() - t0
    added = _self_rss() - before
    await engine.stop()
    trim_heap()
    return seconds, added, _self_rss() - before


def _serve_cmd(model: Path, port: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "llamabox", "serve", "-m", str(model), "--port", str(port),
            "-c", "2048", "-np", "1", "-t", str(threads)]  # fmt: skip


def _start_child(model: Path, threads: int) -> tuple[subprocess.Popen[bytes], str, float]:
    """A child server, and the seconds from its spawn until /health is 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        _serve_cmd(model, port, threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    with httpx.Client(timeout=2) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the child server exited with {proc.returncode}")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return proc, url, time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.005)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the proxy (run as its own process: `models.py --proxy PORT UPSTREAM_PORT`) ----


async def _relay_body(src: asyncio.StreamReader, dst: asyncio.StreamWriter, head: bytes) -> None:
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size_line = await src.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            dst.write(size_line + await src.readexactly(size + 2))
            await dst.drain()
            if size == 0:
                return
    length = int(fields.get(b"content-length", b"0"))
    if length:
        dst.write(await src.readexactly(length))
    await dst.drain()


async def _proxy_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: int
) -> None:
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            up_writer.write(head)
            await _relay_body(reader, up_writer, head)
            response = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await _relay_body(up_reader, writer, response)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        up_writer.close()
        writer.close()


async def _proxy(port: int, upstream: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _proxy_connection(r, w, upstream), "127.0.0.1", port
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _start_proxy(upstream_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    upstream = upstream_url.rsplit(":", 1)[1]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--proxy", str(port), upstream], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc, f"http://127.0.0.1:{port}"


def _latencies(
    url: str, n: int, send: Callable[[httpx.Client, str], httpx.Response]
) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as client:
        send(client, url)  # the connection opened, the path warm
        for _ in range(n):
            t0 = time.perf_counter()
            r = send(client, url)
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return out


def _tokenize(client: httpx.Client, url: str) -> httpx.Response:
    return client.post(f"{url}/tokenize", json={"content": "Hello world"})


def _completion(client: httpx.Client, url: str) -> httpx.Response:
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return client.post(f"{url}/v1/completions", json=body)


def _stream(client: httpx.Client, url: str) -> httpx.Response:
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.read()
    return r


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": 1e3 * median(xs), "p90_ms": 1e3 * percentile(xs, 90)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.tiny:
        from tests.fixtures import make_tiny_llama

        model = make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf")
    else:
        model = model_path(args.model)
    log(f"model: {model} ({model.stat().st_size / 2**20:.1f} MiB), threads {args.threads}")
    loads_in, loads_child, added, kept, child_rss = [], [], [], [], []
    for i in range(args.repeat):
        for side in ("in", "child") if i % 2 == 0 else ("child", "in"):
            if side == "in":
                seconds, rss, left = asyncio.run(_load_in_process(model, args.threads))
                loads_in.append(seconds)
                added.append(rss)
                kept.append(left)
            else:
                proc, _, seconds = _start_child(model, args.threads)
                child_rss.append(rss_bytes(tree_pids(proc.pid)))
                _stop(proc)
                loads_child.append(seconds)
    bare = [
        1024 * int(subprocess.run([sys.executable, "-c", _BARE], capture_output=True, text=True,
                                  check=True).stdout)
        for _ in range(3)
    ]  # fmt: skip

    proc, direct_url, _ = _start_child(model, args.threads)
    proxy, proxy_url = _start_proxy(direct_url)
    hops: dict[str, dict[str, list[float]]] = {}
    try:
        for name, send in (("tokenize", _tokenize), ("completion", _completion),
                           ("stream", _stream)):  # fmt: skip
            got: dict[str, list[float]] = {"direct": [], "proxy": []}
            for block in range(4):
                order = ("direct", "proxy") if block % 2 == 0 else ("proxy", "direct")
                for side in order:
                    url = direct_url if side == "direct" else proxy_url
                    got[side] += _latencies(url, args.requests // 4, send)
            hops[name] = got
    finally:
        _stop(proxy)
        _stop(proc)

    mib = 2**20
    result: dict[str, Any] = {
        "bench": "models",
        "model": str(model),
        "load_s": {
            "in_process": {"median": median(loads_in), "all": loads_in},
            "child_until_health": {"median": median(loads_child), "all": loads_child},
        },
        "memory_mib": {
            "added_in_process": median(added) / mib,
            "left_after_unload": median(kept) / mib,
            "child_total": median(child_rss) / mib,
            "bare_python_with_core": median(bare) / mib,
        },
        "hop": {
            name: {side: _ms(xs) for side, xs in got.items()}
            | {"added_p50_ms": 1e3 * (median(got["proxy"]) - median(got["direct"]))}
            for name, got in hops.items()
        },
    }
    print(f"\nload, median of {args.repeat}: in-process {median(loads_in):.3f} s; child server "
          f"until /health 200 {median(loads_child):.3f} s")  # fmt: skip
    print(f"memory: +{median(added) / mib:.0f} MiB in-process (+{median(kept) / mib:.0f} MiB "
          f"left after its unload); a child {median(child_rss) / mib:.0f} MiB; bare python + "
          f"_core {median(bare) / mib:.0f} MiB")  # fmt: skip
    for name, row in result["hop"].items():
        print(f"{name:>10}: direct p50 {row['direct']['p50_ms']:.2f} ms (p90 "
              f"{row['direct']['p90_ms']:.2f}), through a proxy p50 {row['proxy']['p50_ms']:.2f} "
              f"ms (p90 {row['proxy']['p90_ms']:.2f}): +{row['added_p50_ms']:.2f} ms")  # fmt: skip
    return result


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--proxy":
        try:
            import uvloop

            uvloop.run(_proxy(int(sys.argv[2]), int(sys.argv[3])))
        except ImportError:
            asyncio.run(_proxy(int(sys.argv[2]), int(sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: Gemma 3 270M, llamabox's default)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random model")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="per request kind and side")
    ap.add_argument("--threads", type=int, default=default_threads())
    print(json.dumps(run(ap.parse_args())))


if __name__ == "__main__":
    main()
