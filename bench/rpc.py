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

from common import RESULTS_DIR, bench_pair, log, pair_args, ratio_table  # noqa: E402
from servers import free_port, start_server, stop_server, wait_ready  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    args = pair_args(ap, threads=1)
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
                runs[name].append(bench_pair(servers[name].url, args))
                log(f"{name} pass {rep + 1} done")
    finally:
        for s in servers.values():
            stop_server(s)
        rpc.terminate()
        rpc.wait(30)
    rows = ratio_table(runs, "local", "rpc", args.concurrency)
    print(json.dumps({"bench": "rpc", "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
