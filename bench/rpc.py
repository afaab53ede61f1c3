"""The cost of ggml RPC on loopback: llamabox serving with its layers on a local
``llamabox rpc-server`` against the same server computing them itself.

Both servers are up all along; ``llamabox bench`` (the same measuring code as ``llamabox bench``)
runs against each in turn at every concurrency, alternating, and the table gives output
tokens/s, TTFT p50 and the ratio RPC / local.

    python bench/rpc.py --threads 1 --concurrency 1,4 --requests 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, log  # noqa: E402
from servers import free_port, start_server, stop_server, wait_ready  # noqa: E402


def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llamabox", "bench", "--url", url, "--json", "--quiet",
           "--concurrency", args.concurrency, "--requests", str(args.requests),
           "--max-tokens", str(args.max_tokens), "--ignore-eos"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.model is None:
        from llamabox.models import default_model_path

        args.model = str(default_model_path())
    n_par = max(int(c) for c in args.concurrency.split(","))
    rpc_port = free_port()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rpc_log = open(RESULTS_DIR / "rpc-server.log", "wb")
    rpc = subprocess.Popen(
        [sys.executable, "-m", "llamabox", "rpc-server", "--port", str(rpc_port),
         "-t", str(args.threads)], stdout=rpc_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    while True:
        try:
            socket.create_connection(("127.0.0.1", rpc_port), 0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    common = ["-m", args.model, "-np", str(n_par), "-c", str(1024 * n_par),
              "-t", str(args.threads), "-tb", str(args.threads)]  # fmt: skip
    servers = {}
    try:
        for name, extra in (("local", []), ("rpc", ["--rpc", f"127.0.0.1:{rpc_port}"])):
            port = free_port()
            cmd = [sys.executable, "-m", "llamabox", "serve", *common, *extra, "--port", str(port)]
            servers[name] = start_server(f"llamabox-{name}", cmd, port, "rpc-bench")
            asyncio.run(wait_ready(servers[name]))
        runs: dict[str, list[dict[str, Any]]] = {"local": [], "rpc": []}
        for rep in range(args.repeat):
            for name in ("local", "rpc") if rep % 2 == 0 else ("rpc", "local"):
                runs[name].append(bench(servers[name].url, args))
                log(f"{name} pass {rep + 1} done")
    finally:
        for s in servers.values():
            stop_server(s)
        rpc.terminate()
        rpc.wait(30)
    print(f"{'clients':>7} {'local tok/s':>11} {'rpc tok/s':>9} {'ratio':>6} "
          f"{'TTFT p50 local':>14} {'rpc':>7}")  # fmt: skip
    rows = []
    for i, c in enumerate(int(c) for c in args.concurrency.split(",")):

        def med(name: str, key: str, sub: str | None = None, i: int = i) -> float:
            vals = []
            for r in runs[name]:
                v = r["levels"][i][key]
                vals.append(float(v[sub] if sub else v))
            vals.sort()
            return vals[len(vals) // 2]

        lt, rt = med("local", "output_tokens_per_s"), med("rpc", "output_tokens_per_s")
        lf, rf = med("local", "ttft_ms", "p50"), med("rpc", "ttft_ms", "p50")
        rows.append({"clients": c, "local_tok_s": lt, "rpc_tok_s": rt, "ratio": rt / lt,
                     "ttft_p50_local_ms": lf, "ttft_p50_rpc_ms": rf})  # fmt: skip
        print(f"{c:>7} {lt:>11.1f} {rt:>9.1f} {rt / lt:>6.2f} {lf:>14.0f} {rf:>7.0f}")
    print(json.dumps({"bench": "rpc", "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
