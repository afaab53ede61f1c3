"""Does a heavy request stall the others' streams? ``llamabox serve`` versus ``llama-server``.

    python bench/stall.py [--model GGUF] [--threads 1] [--repeat 3] [--words 100000]

Starts both servers on the same model (``-np 8 -c 8192 -t T -tb T``). For each server and
repeat (alternating which server goes first): one client streams greedy tokens from
``/v1/completions``; once it runs, another client sends, one after the other, a completion whose
prompt is ~600 kB of text (about 100k Gemma tokens: far past the context, so the answer is a
400, but only after it is tokenized), a chat completion with that text as its message, and a
completion constrained by a 500-property JSON schema. Measured on the streaming client (a
process of its own, so the heavy client's work does not delay it): its median gap between two
chunks before, and its largest gap while the heavy requests run. Target: llamabox's largest gap
below llama-server's. The last line is JSON (``{"bench": "stall", ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORDS, Streamer, build_llama_tools, log, median, model_path  # noqa: E402
from servers import SERVERS, free_port, pair_commands, start_both, stop_server  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {f"field_{i}": {"type": "string"} for i in range(500)},
    "required": [f"field_{i}" for i in range(500)],
}


def heavy_bodies(words: int) -> list[tuple[str, str, bytes]]:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    cases = [
        ("completion", "/v1/completions", {"prompt": text, "max_tokens": 1}),
        (
            "chat",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": text}], "max_tokens": 1},
        ),
        ("schema", "/v1/completions", {"prompt": "x", "max_tokens": 1, "json_schema": SCHEMA}),
    ]
    return [(what, path, json.dumps(body).encode()) for what, path, body in cases]


def one_run(url: str, bodies: list[tuple[str, str, bytes]]) -> dict[str, object]:
    stream_body = {
        "prompt": "Once upon a time",
        "max_tokens": 100000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    streamer = Streamer(url, "/v1/completions", stream_body, 120)
    time.sleep(2.0)  # the stream's own pace first
    t_heavy = time.monotonic()
    statuses = {}
    with httpx.Client(timeout=300) as http:
        for what, path, body in bodies:
            t0 = time.monotonic()
            r = http.post(url + path, content=body, headers={"content-type": "application/json"})
            statuses[what] = (r.status_code, round(time.monotonic() - t0, 3))
    t_done = time.monotonic()
    time.sleep(0.5)
    times = streamer.stop()
    gaps = [(b - a, b) for a, b in zip(times, times[1:], strict=False)]
    before = [g for g, t in gaps if t < t_heavy]
    during = [g for g, t in gaps if t_heavy <= t <= t_done]
    if not before or not during:
        raise RuntimeError("the stream ended too soon: raise -c or lower --words")
    return {
        "normal_gap_ms": round(1e3 * statistics.median(before), 1),
        "largest_gap_ms": round(1e3 * max(during), 1),
        "heavy_s": round(t_done - t_heavy, 2),
        "requests": statuses,
    }


async def amain(args: argparse.Namespace) -> int:
    model = model_path(args.model)
    llama_server = build_llama_tools()["llama-server"]
    ports = {name: free_port() for name in SERVERS}
    common = ["-m", str(model), "-np", "8", "-c", "8192", "-t", str(args.threads)]
    common += ["-tb", str(args.threads)]
    cmds = pair_commands(llama_server, common, ports, llamabox_args="--max-body-size 64M")
    servers = await start_both(cmds, ports, "stall")
    bodies = heavy_bodies(args.words)
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in SERVERS}
    try:
        for rep in range(args.repeat):
            order = list(SERVERS) if rep % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                result = await asyncio.to_thread(one_run, servers[name].url, bodies)
                runs[name].append(result)
                log(f"rep {rep + 1}/{args.repeat} {name:12}: {result}")
    finally:
        for server in servers.values():
            stop_server(server)

    print()
    print(f"{'server':12} | {'normal gap ms':>13} | {'largest gap ms':>14} | heavy requests s")
    print("-" * 64)
    summary = {}
    for name in SERVERS:
        normal = median([float(r["normal_gap_ms"]) for r in runs[name]])  # type: ignore[arg-type]
        largest = median([float(r["largest_gap_ms"]) for r in runs[name]])  # type: ignore[arg-type]
        heavy = median([float(r["heavy_s"]) for r in runs[name]])  # type: ignore[arg-type]
        summary[name] = {"normal_gap_ms": normal, "largest_gap_ms": largest, "heavy_s": heavy}
        print(f"{name:12} | {normal:13.1f} | {largest:14.0f} | {heavy:.1f}")
    print(
        f"(medians of {args.repeat}; the heavy requests: a {len(bodies[0][2]) // 1000} kB "
        "completion, the same as a chat message, a 500-property JSON schema)"
    )
    print(json.dumps({"bench": "stall", "threads": args.threads, "summary": summary, "runs": runs}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF model (default: llamabox's default, Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=1, help="-t and -tb of both servers")
    ap.add_argument("--repeat", type=int, default=3, help="runs per server")
    ap.add_argument("--words", type=int, default=100_000, help="words in the heavy prompt")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
