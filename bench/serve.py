"""Load generator: ``llamabox serve`` versus llama.cpp's ``llama-server``, side by side.

    python bench/serve.py [--model GGUF] [--concurrency 1,4,8,16] [--prompt-tokens 128]
                          [--max-tokens 128] [--requests-per-client 2] [--threads N]
                          [--endpoint completions|chat] [--repeat 1] [--no-prefix]
                          [--only llamabox|llama-server] [--llamabox-url URL]
                          [--llama-server-args "--cache-ram 0"] [--llamabox-args ARGS]

Starts both servers on the same model with the same flags (``-np 8 -c 8192 -t N -tb N``) and
leaves both running, then for each concurrency level runs the same workload against one and then
the other (the order alternates from level to level), so both see the same machine load.

Workload at concurrency C: C clients, each sending ``--requests-per-client`` streaming requests
one after the other (``/v1/completions`` by default), every prompt distinct (~``--prompt-tokens``
tokens of words), ``max_tokens`` = ``--max-tokens`` with ``ignore_eos`` and greedy sampling, so
both servers generate exactly the same number of tokens.

Measured per server and level:

- TTFT: from sending the request to the first chunk carrying text (p50, p95).
- ITL: inter-token latency, per request (time of last text chunk - time of first) / (tokens - 1);
  p50 over the requests. Robust to a server that packs several tokens into one chunk.
- tok/s: aggregate generation throughput, all completion tokens / wall time of the level.
- RSS: resident memory of the server process and its children (``VmRSS`` in /proc), the peak
  sampled every 0.1 s during the level; ``rss_idle`` is after loading and a warm-up request.

Then the prefix-cache scenario, on a fresh pair of servers with ``-c 16384`` (2048 tokens per
slot, as a ~1,600-token prompt does not fit the 1,024 of ``-c 8192 -np 8``): a streaming chat with
a ~1,600-token system prompt, first cold (a system prompt neither server has seen), then the same
system prompt with a different user message: TTFT cold and warm.

Both servers get the same chat template (Gemma 3's, see GEMMA_TEMPLATE) unless
``--own-templates``. Prints the tables and a final JSON line (``{"bench": "serve", ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamabox import benchmark
from llamabox.benchmark import RequestResult, Target, stream_one

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    WORDS,
    build_llama_tools,
    default_threads,
    log,
    median,
    model_path,
    ratio,
)
from servers import (  # noqa: E402
    SERVERS,
    RssSampler,
    Server,
    free_port,
    pair_commands,
    rss_bytes,
    start_server,
    stop_server,
    tree_pids,
    wait_ready,
)

# The Gemma 3 270M base GGUF has no chat template, and the two servers fall back to different ones
# (llama-server: ChatML, whose markers are not single tokens in Gemma's vocabulary; llamabox:
# Gemma's turns). Both get this one (Gemma 3's, less the BOS that both add when tokenizing) with
# --chat-template-file, so that they process the same tokens (--own-templates: not).
GEMMA_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}
{{- message['content'] | trim -}}
{{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""


# ---------------------------------------------------------------- one request
# Sending, timing and counting are llamabox.benchmark's (`llamabox bench`): TTFT to the first
# chunk carrying text, ITL here is its per-request TPOT, (last text chunk - first) / (tokens - 1),
# and tokens come from the stream's usage (else its text chunks).


def target(server: Server, endpoint: str) -> Target:
    return Target.from_url(server.url, chat=endpoint == "chat")


def make_prompt(rng: random.Random, n_words: int, tag: str) -> str:
    return f"{tag}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def request_body(
    endpoint: str, prompt: str, max_tokens: int, system: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "bench",
        "max_tokens": max_tokens,
        "n_predict": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "completions":
        body["prompt"] = prompt
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        body["messages"] = messages
    return body


# ---------------------------------------------------------------- one level


@dataclass
class Level:
    server: str
    concurrency: int
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    rss_peak: int = 0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if not r.ok]

    def summary(self) -> dict[str, float]:
        ok = self.ok
        run = benchmark.LevelRun(
            concurrency=self.concurrency, results=self.results, wall_s=self.wall_s
        )
        s = benchmark.summarize(run)

        def ms(value: float | None) -> float:
            return float("nan") if value is None else value

        return {
            "tok_s": s.output_tokens_per_s if self.wall_s else float("nan"),
            "ttft_p50_ms": ms(s.ttft_ms.p50),
            "ttft_p95_ms": ms(s.ttft_ms.p95),
            "itl_p50_ms": ms(s.tpot_ms.p50),
            "rss_peak_mb": self.rss_peak / 1e6,
            "requests": s.requests,
            "errors": s.errors,
            "prompt_tokens_mean": s.input_tokens / len(ok) if ok else 0.0,
            "completion_tokens": s.output_tokens,
            "wall_s": self.wall_s,
        }


async def run_level(
    server: Server,
    concurrency: int,
    prompts: list[list[str]],
    endpoint: str,
    max_tokens: int,
) -> Level:
    level = Level(server=server.name, concurrency=concurrency)
    # concurrency clients take the requests in turn from one queue: round j holds every
    # client's j-th prompt, so each client sends about its own list, one request after another
    bodies = [
        request_body(endpoint, p, max_tokens)
        for round_ in zip(*prompts, strict=True)
        for p in round_
    ]
    sampler = RssSampler(server.pid) if server.pid is not None else None
    if sampler is not None:
        sampler.__enter__()
    t0 = time.perf_counter()
    try:
        run = await benchmark.run_level(target(server, endpoint), concurrency, bodies)
        level.results = run.results
    finally:
        level.wall_s = time.perf_counter() - t0
        if sampler is not None:
            sampler.__exit__()
            level.rss_peak = sampler.peak
    return level


async def warm_up(server: Server, endpoint: str) -> None:
    body = request_body(endpoint, "Hello, warm-up.", 8)
    r = await stream_one(target(server, endpoint), body)
    if not r.ok:
        raise RuntimeError(f"{server.name}: warm-up request failed: {r.error}")
    if server.pid is not None:
        server.rss_idle = rss_bytes(tree_pids(server.pid))


# ---------------------------------------------------------------- prefix cache


async def prefix_scenario(
    server: Server, system_words: int, max_tokens: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    system = (
        "You are a helpful assistant. Here is the background document you must use:\n"
        + " ".join(rng.choice(WORDS) for _ in range(system_words))
    )
    out: dict[str, Any] = {}
    for kind, question in (
        ("cold", "Summarize the document in one sentence."),
        ("warm", "Which words appear most often in the document?"),
    ):
        body = request_body("chat", question, max_tokens, system=system)
        r = await stream_one(target(server, "chat"), body)
        if not r.ok:
            raise RuntimeError(f"{server.name}: prefix {kind} request failed: {r.error}")
        out[f"ttft_{kind}_ms"] = 1000 * r.ttft_s
        out[f"prompt_tokens_{kind}"] = r.prompt_tokens
        out[f"cached_tokens_{kind}"] = r.cached_tokens
    return out


# ---------------------------------------------------------------- main


def server_cmds(
    args: argparse.Namespace,
    model: Path,
    threads: int,
    ctx: int,
    ports: dict[str, int],
    extra: list[str],
) -> dict[str, list[str]]:
    common = ["-m", str(model), "-np", str(args.parallel), "-c", str(ctx)]
    common += ["-t", str(threads), "-tb", str(threads), *extra]
    return pair_commands(
        args.llama_server, common, ports, args.llamabox_args, args.llama_server_args
    )


async def start_pair(
    args: argparse.Namespace,
    model: Path,
    threads: int,
    ctx: int,
    tag: str,
    names: list[str],
    extra: list[str] | None = None,
) -> dict[str, Server]:
    ports = {n: free_port() for n in SERVERS}
    cmds = server_cmds(args, model, threads, ctx, ports, extra or [])
    servers: dict[str, Server] = {}
    try:
        for name in names:
            if name == "llamabox" and args.llamabox_url:
                servers[name] = Server(name=name, url=args.llamabox_url.rstrip("/"), proc=None)
            else:
                servers[name] = start_server(name, cmds[name], ports[name], tag)
        for s in servers.values():
            await wait_ready(s)
            await warm_up(s, args.endpoint)
            log(f"{s.name} ready at {s.url}, idle RSS {s.rss_idle / 1e6:.0f} MB")
    except BaseException:
        for s in servers.values():
            stop_server(s)
        raise
    return servers


def fmt_ratio(a: float, b: float) -> str:
    r = ratio(a, b)
    return "  -  " if r != r else f"{r:5.2f}"


def print_tables(
    levels: dict[tuple[str, int], list[Level]], concurrency: list[int], names: list[str]
) -> dict[int, dict[str, dict[str, float]]]:
    """Medians over repeats per (server, concurrency), printed as a table; returns them."""
    table: dict[int, dict[str, dict[str, float]]] = {}
    for c in concurrency:
        table[c] = {}
        for name in names:
            sums = [lv.summary() for lv in levels.get((name, c), [])]
            if not sums:
                continue
            table[c][name] = {k: median([s[k] for s in sums]) for k in sums[0]}
            table[c][name]["errors"] = float(sum(s["errors"] for s in sums))
    lb, ls = "llamabox", "llama-server"
    head = (
        f"{'conc':>4} | {'tok/s lb':>8} {'ls':>7} {'ratio':>5} | {'TTFT p50 ms lb':>14} {'ls':>7} "
        f"{'ratio':>5} | {'TTFT p95 lb':>11} {'ls':>7} | {'ITL p50 ms lb':>13} {'ls':>6} | "
        f"{'RSS MB lb':>9} {'ls':>6} {'diff':>5} | {'err':>3}"
    )
    print(head)
    print("-" * len(head))
    nan = float("nan")
    for c in concurrency:
        a = table[c].get(lb, {})
        b = table[c].get(ls, {})

        def g(d: dict[str, float], k: str) -> float:
            return d.get(k, nan)

        print(
            f"{c:>4} | {g(a, 'tok_s'):>8.1f} {g(b, 'tok_s'):>7.1f} "
            f"{fmt_ratio(g(a, 'tok_s'), g(b, 'tok_s'))} | "
            f"{g(a, 'ttft_p50_ms'):>14.0f} {g(b, 'ttft_p50_ms'):>7.0f} "
            f"{fmt_ratio(g(a, 'ttft_p50_ms'), g(b, 'ttft_p50_ms'))} | "
            f"{g(a, 'ttft_p95_ms'):>11.0f} {g(b, 'ttft_p95_ms'):>7.0f} | "
            f"{g(a, 'itl_p50_ms'):>13.1f} {g(b, 'itl_p50_ms'):>6.1f} | "
            f"{g(a, 'rss_peak_mb'):>9.0f} {g(b, 'rss_peak_mb'):>6.0f} "
            f"{g(a, 'rss_peak_mb') - g(b, 'rss_peak_mb'):>+5.0f} | "
            f"{int(g(a, 'errors') if a else 0) + int(g(b, 'errors') if b else 0):>3}"
        )
    print(
        "(lb = llamabox, ls = llama-server; medians over repeats; ratios lb/ls; targets: tok/s "
        ">= 1.0, TTFT p50 <= 1.1, RSS diff <= +80 MB)"
    )
    return table


async def amain(args: argparse.Namespace) -> int:
    model = model_path(args.model)
    threads = args.threads or default_threads()
    concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    names = [args.only] if args.only else list(SERVERS)
    if "llama-server" in names and args.llama_server is None:
        args.llama_server = build_llama_tools()["llama-server"]
    log(
        f"model {model}, threads {threads}, -np {args.parallel} -c {args.ctx}, {args.endpoint}, "
        f"~{args.prompt_tokens} prompt tokens, {args.max_tokens} max tokens"
    )

    extra: list[str] = []
    if not args.own_templates:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        template = RESULTS_DIR / "gemma-chat-template.jinja"
        template.write_text(GEMMA_TEMPLATE)
        extra = ["--chat-template-file", str(template)]

    levels: dict[tuple[str, int], list[Level]] = {}
    servers = await start_pair(args, model, threads, args.ctx, "load", names, extra=extra)
    try:
        idle = {n: s.rss_idle for n, s in servers.items()}
        step = 0
        for rep in range(args.repeat):
            for c in concurrency:
                rng = random.Random(args.seed * 1000 + rep * 100 + c)
                n_req = max(args.requests_per_client, args.min_requests // c if c else 0)
                # ~1 token per word plus a few for the tag: aim at --prompt-tokens
                prompts = [
                    [
                        make_prompt(rng, max(1, args.prompt_tokens - 10), f"Text {rep}.{c}.{i}.{j}")
                        for j in range(n_req)
                    ]
                    for i in range(c)
                ]
                order = names if step % 2 == 0 else names[::-1]
                step += 1
                for name in order:
                    lv = await run_level(servers[name], c, prompts, args.endpoint, args.max_tokens)
                    levels.setdefault((name, c), []).append(lv)
                    sm = lv.summary()
                    log(
                        f"rep {rep + 1} conc {c:>2} {name:<12}: {sm['tok_s']:6.1f} tok/s, TTFT p50 "
                        f"{sm['ttft_p50_ms']:6.0f} ms p95 {sm['ttft_p95_ms']:6.0f} ms, ITL p50 "
                        f"{sm['itl_p50_ms']:5.1f} ms, RSS peak {sm['rss_peak_mb']:5.0f} MB, "
                        f"prompt {sm['prompt_tokens_mean']:.0f} tok, errors {int(sm['errors'])}"
                    )
                    for err in lv.errors[:3]:
                        log(f"  error: {err}")
    finally:
        for s in servers.values():
            stop_server(s)

    prefix: dict[str, dict[str, Any]] = {}
    if not args.no_prefix:
        servers = await start_pair(
            args, model, threads, args.prefix_ctx, "prefix", names, extra=extra
        )
        try:
            for i, name in enumerate(names):
                prefix[name] = await prefix_scenario(
                    servers[name], args.system_words, 16, seed=args.seed + 7 * i + int(time.time())
                )
                log(f"prefix {name}: {prefix[name]}")
        finally:
            for s in servers.values():
                stop_server(s)

    print()
    table = print_tables(levels, concurrency, names)
    if prefix:
        print()
        head = f"{'prefix cache (chat)':<20} | {'TTFT cold ms':>12} | {'TTFT warm ms':>12} | "
        head += f"{'prompt tok':>10} | {'cached (warm)':>13}"
        print(head)
        print("-" * len(head))
        for name, p in prefix.items():
            print(
                f"{name:<20} | {p['ttft_cold_ms']:>12.0f} | {p['ttft_warm_ms']:>12.0f} | "
                f"{p['prompt_tokens_cold']:>10} | {p['cached_tokens_warm']:>13}"
            )
    result = {
        "bench": "serve",
        "model": str(model),
        "threads": threads,
        "parallel": args.parallel,
        "ctx": args.ctx,
        "endpoint": args.endpoint,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "rss_idle_mb": {n: round(v / 1e6, 1) for n, v in idle.items()},
        "levels": {
            str(c): {
                **{n: {k: round(v, 2) for k, v in d.items()} for n, d in table[c].items()},
                "ratios": {
                    "tok_s": round(
                        ratio(
                            table[c].get("llamabox", {}).get("tok_s", float("nan")),
                            table[c].get("llama-server", {}).get("tok_s", float("nan")),
                        ),
                        3,
                    ),
                    "ttft_p50": round(
                        ratio(
                            table[c].get("llamabox", {}).get("ttft_p50_ms", float("nan")),
                            table[c].get("llama-server", {}).get("ttft_p50_ms", float("nan")),
                        ),
                        3,
                    ),
                },
            }
            for c in concurrency
        },
        "prefix": prefix,
    }
    print(json.dumps(result, allow_nan=True))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF model (default: llamabox's default, Gemma 3 270M)")
    ap.add_argument("--concurrency", default="1,4,8,16", help="concurrent clients, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument(
        "--requests-per-client", type=int, default=2, help="sequential requests per client"
    )
    ap.add_argument(
        "--min-requests", type=int, default=4, help="at least this many requests per level"
    )
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--threads", type=int, default=0, help="server threads (default: usable CPUs)")
    ap.add_argument("--parallel", type=int, default=8, help="server slots (-np)")
    ap.add_argument("--ctx", type=int, default=8192, help="server context (-c)")
    ap.add_argument("--prefix-ctx", type=int, default=16384, help="-c for the prefix scenario")
    ap.add_argument("--system-words", type=int, default=1570, help="system prompt size (words)")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the concurrency levels")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-prefix", action="store_true", help="skip the prefix-cache scenario")
    ap.add_argument("--only", choices=SERVERS, help="benchmark one server only")
    ap.add_argument(
        "--own-templates",
        action="store_true",
        help="let each server use its own chat template (default: both get Gemma 3's)",
    )
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (default: build it)")
    ap.add_argument(
        "--llama-server-args",
        default="",
        help="extra llama-server flags, e.g. '--cache-ram 0' (no host-memory prompt cache)",
    )
    ap.add_argument("--llamabox-args", default="", help="extra `llamabox serve` flags")
    ap.add_argument(
        "--llamabox-url", help="use an already running llamabox at this URL (no RSS then)"
    )
    args = ap.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
