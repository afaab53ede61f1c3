"""The HTTP layer's own cost: ``llamabox serve`` versus ``llama-server`` under wrk.

    python bench/http_layer.py [--model GGUF] [--threads 1] [--connections 16] [--duration 5]
                         [--repeat 3]

Starts both servers on the same model with the same flags (``-np 8 -c 8192 -t T -tb T``), then
for each repeat runs wrk (``-t2 -c C -d D``) on each endpoint against one server and then the
other, alternating which goes first. Endpoints: ``GET /v1/models`` (no engine work at all) and
``POST /tokenize`` of a 34-character text (one short call into llama.cpp's tokenizer). Reports
requests per second, medians over the repeats, and the ratio llamabox / llama-server; targets
0.5 on /v1/models and 0.8 on /tokenize. The last line is JSON (``{"bench": "http", ...}``).

wrk must be on PATH (Debian: ``apt-get install wrk``). On a 2-core machine wrk's own threads
take CPU from the server under test; both servers pay that alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_llama_tools, log, median, model_path, ratio  # noqa: E402
from servers import SERVERS, free_port, pair_commands, start_both, stop_server  # noqa: E402

TOKENIZE_BODY = '{"content": "Hello world, this is a short text."}'
ENDPOINTS = {
    "GET /v1/models": ("/v1/models", None),
    "POST /tokenize": ("/tokenize", TOKENIZE_BODY),
}
TARGETS = {"GET /v1/models": 0.5, "POST /tokenize": 0.8}


def wrk(url: str, body: str | None, connections: int, duration: float) -> float:
    """Requests per second of one wrk run."""
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(
                'wrk.method = "POST"\n'
                f"wrk.body = {json.dumps(body)}\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
    cmd += ["-s", script.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    Path(script.name).unlink()
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk on {url}:\n{out}")
    return float(match.group(1))


async def amain(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not on PATH (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    model = model_path(args.model)
    llama_server = build_llama_tools()["llama-server"]
    ports = {name: free_port() for name in SERVERS}
    common = ["-m", str(model), "-np", "8", "-c", "8192", "-t", str(args.threads)]
    common += ["-tb", str(args.threads)]
    servers = await start_both(pair_commands(llama_server, common, ports), ports, "http")
    samples: dict[str, dict[str, list[float]]] = {e: {s: [] for s in SERVERS} for e in ENDPOINTS}
    try:
        for rep in range(args.repeat):
            for k, (endpoint, (path, body)) in enumerate(ENDPOINTS.items()):
                order = list(SERVERS) if (rep + k) % 2 == 0 else list(reversed(SERVERS))
                for name in order:
                    rps = wrk(servers[name].url + path, body, args.connections, args.duration)
                    samples[endpoint][name].append(rps)
                    log(f"rep {rep + 1}/{args.repeat} {endpoint:15} {name:12}: {rps:9.0f} req/s")
    finally:
        for server in servers.values():
            stop_server(server)

    print()
    print(f"{'endpoint':16} | {'llamabox':>9} | {'llama-server':>12} | {'ratio':>5} | target")
    print("-" * 60)
    rows = {}
    for endpoint in ENDPOINTS:
        lb, ls = (median(samples[endpoint][name]) for name in SERVERS)
        rows[endpoint] = {"llamabox": lb, "llama_server": ls, "ratio": round(ratio(lb, ls), 3)}
        print(
            f"{endpoint:16} | {lb:9.0f} | {ls:12.0f} | {ratio(lb, ls):5.2f} | "
            f">= {TARGETS[endpoint]}"
        )
    print(
        f"(requests/s, wrk -t2 -c{args.connections} -d{args.duration:g}s, medians of {args.repeat})"
    )
    print(json.dumps({"bench": "http", "threads": args.threads, "rows": rows, "samples": samples}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF model (default: llamabox's default, Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=1, help="-t and -tb of both servers")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per server and endpoint")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
