"""``llamabox rpc-server``: this machine's CPU for other llamabox servers, over ggml RPC.

Another machine's ``llamabox serve --rpc HOST:PORT`` then offloads layers here, as it would to
a GPU (``--n-gpu-layers``): llama.cpp's RPC backend, the one LLaMA Box and GPUStack use for
multi-host. The protocol has no authentication and no encryption: serve only on a trusted
network (the default host is loopback).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType

__all__ = ["main"]

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamabox rpc-server",
        description="Serve this machine's CPU to llamabox servers started with --rpc HOST:PORT.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    ap.add_argument(
        "-t",
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="CPU threads for the graphs it computes (default: half the logical CPUs)",
    )
    ap.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep tensors clients sent in DIR, so that a restarted client loads faster",
    )
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        print("llamabox rpc-server: error: --port must be in 1..65535", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("llamabox rpc-server: error: --threads must be at least 1", file=sys.stderr)
        return 2
    from llamabox import _core

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"llamabox rpc-server: warning: listening on {args.host}: ggml RPC has no "
            "authentication; expose it only to machines you trust",
            file=sys.stderr,
        )
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    failed: list[str] = []
    stopped = threading.Event()

    def serve() -> None:
        try:
            _core.rpc_server(args.host, args.port, args.threads, args.cache_dir or "")
            failed.append(f"cannot serve on {args.host}:{args.port} (see ggml's message above)")
        except Exception as e:  # noqa: BLE001 - reported to the user, then exit 1
            failed.append(str(e))
        stopped.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(
        f"llamabox rpc-server: serving this machine's CPU on {args.host}:{args.port} "
        f"({args.threads} threads)",
        file=sys.stderr,
        flush=True,
    )
    # The server blocks in C++ without the GIL; it ends with the process.
    threading.Thread(target=serve, name="rpc-server", daemon=True).start()
    stopped.wait()
    if failed:
        print(f"llamabox rpc-server: error: {failed[0]}", file=sys.stderr)
        return 1
    return 0
