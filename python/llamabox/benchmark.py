"""``llamabox bench``: a serving benchmark against any OpenAI-compatible server.

    llamabox bench --url URL [--concurrency 1,4,16] [--requests N | --duration S]
                   [--max-tokens N] [--chat] [--plot FILE.png] [--json]

For each concurrency level C, C clients send streaming requests one after another (a closed
loop) until ``--requests`` have been sent or ``--duration`` seconds have passed; the level ends
when the last one finishes. Each request asks for ``stream_options: {"include_usage": true}``.

Measured per request (monotonic clock, one timestamp per received piece of the stream):

- TTFT: from sending the request to the first chunk that carries text (a chat chunk with only
  the role does not count);
- ITL: the gaps between consecutive chunks that carry text, pooled over the requests. That is
  one gap per token only where each chunk carries one token: a server may pack several (llamabox
  merges the tokens a slow reader has not taken yet, and a token that ends inside a UTF-8
  character carries no text), which shows as fewer, longer gaps;
- TPOT: per request, (last text chunk - first) / (output tokens - 1), which does not depend on
  how many tokens a server packs into one chunk;
- E2E: from sending the request to the end of its stream;
- output tokens: ``usage.completion_tokens`` of the stream, else the number of text chunks (a
  lower bound where chunks carry several tokens; ``tokens_counted_by`` says which).

Per level: output tokens/s and requests/s are the completed requests' totals over the level's
wall time. A request fails (and counts in ``errors``) on a refused or broken connection, a
status other than 200, an ``error`` event in the stream, or a stream without text.

``--json`` prints one object on stdout (the table then goes to stderr)::

    {"schema": "llamabox-bench/1", "url": str, "endpoint": "/v1/completions", "model": str|null,
     "max_tokens": int, "temperature": float, "ignore_eos": bool, "prompts": str,
     "requests_per_level": int|null, "duration_s": float|null, "warmup": int,
     "levels": [{"concurrency": int, "requests": int, "completed": int, "errors": int,
                 "duration_s": float, "requests_per_s": float, "output_tokens_per_s": float,
                 "output_tokens": int, "input_tokens": int,
                 "tokens_counted_by": "usage"|"chunks"|"mixed"|"none",
                 "ttft_ms": DIST, "itl_ms": DIST, "tpot_ms": DIST, "e2e_ms": DIST,
                 "error_messages": {message: count}}]}

where DIST is ``{"mean", "p50", "p90", "p95", "p99", "max"}`` in milliseconds, each ``null``
when there is no sample. ``prompts`` is "builtin", "custom" (``--prompt``) or "words:N";
``requests_per_level`` is ``--requests`` (null: 4 per client, or ``--duration``);
``input_tokens`` is 0 when the server reports no usage; ``error_messages`` holds the 10 most
frequent. New keys may be added; existing ones keep their meaning. The exit code is 0, or 1 when
a level had no successful request (or the server cannot be reached), 2 for a usage error.

The client is the standard library's asyncio streams with HTTP/1.1 and SSE parsed in
``llamabox._bench_client`` (one keep-alive connection per client): no dependency, a timestamp as
each piece of a stream arrives, and hundreds of streams on one thread. The results' model, their
statistics, the table and the plot are ``llamabox._bench_report``'s; this module re-exports the
public names of both. ``--plot`` needs matplotlib (``pip install 'llamabox[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec

from llamabox._bench_client import (
    ConnectError,
    Connection,
    RequestResult,
    SSEParser,
    Target,
    served_model,
    stream_one,
    stream_request,
)
from llamabox._bench_report import (
    SCHEMA,
    BenchReport,
    Distribution,
    LevelResult,
    LevelRun,
    PlotUnavailable,
    distribution,
    format_table,
    load_matplotlib,
    summarize,
    write_plot,
)

__all__ = [
    "BUILTIN_PROMPTS",
    "SCHEMA",
    "BenchReport",
    "Distribution",
    "LevelResult",
    "LevelRun",
    "PlotUnavailable",
    "RequestResult",
    "SSEParser",
    "Target",
    "distribution",
    "format_table",
    "main",
    "run_level",
    "stream_one",
    "summarize",
    "write_plot",
]


# ---------------------------------------------------------------- levels


async def run_level(
    target: Target,
    concurrency: int,
    bodies: Iterable[Mapping[str, Any]],
    *,
    duration_s: float | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LevelRun:
    """``concurrency`` clients, each sending the next of ``bodies`` when its last one is done,
    until ``bodies`` runs out or (with ``duration_s``) the time is up; all of them must stream."""
    todo = iter(bodies)
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    deadline = None if duration_s is None else t0 + duration_s

    async def client() -> None:
        conn = Connection(target)
        try:
            while deadline is None or time.perf_counter() < deadline:
                body = next(todo, None)
                if body is None:
                    return
                result = await stream_request(conn, body)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LevelRun(concurrency=concurrency, results=results, wall_s=time.perf_counter() - t0)


# ---------------------------------------------------------------- workload

_TOPICS = (
    "lighthouses", "volcanoes", "the printing press", "honeybees", "glaciers", "steam engines",
    "coral reefs", "the moon landing", "bread baking", "tides", "the violin", "desert cities",
    "bicycles", "thunderstorms", "ancient libraries", "submarines",
)  # fmt: skip
_TASKS = (
    "Write a short story about {}.",
    "Explain the science behind {}, step by step.",
    "Write an encyclopedia article about {}.",
    "Write a poem about {}.",
    "Tell the history of {} in detail.",
    "List twenty facts about {}.",
)
BUILTIN_PROMPTS = tuple(task.format(topic) for topic in _TOPICS for task in _TASKS)
_WORDS = (
    "river mountain quiet engine silver garden window paper orange thunder candle harbor violet "
    "market pencil winter forest bridge copper lantern meadow planet circle feather marble ocean "
    "rocket shadow velvet whistle canyon desert island jungle valley glacier the a of and to in"
).split()


def _prompts(args: argparse.Namespace) -> Iterator[str]:
    """Every request's prompt, in order over the warm-up and all levels."""
    rng = random.Random(args.seed)
    for i in itertools.count():
        if args.prompt is not None:
            yield args.prompt
        elif args.prompt_words:
            yield f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(args.prompt_words))
        else:
            yield BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]


def _body_for(args: argparse.Namespace, model: str | None, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {} if model is None else {"model": model}
    if args.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


# ---------------------------------------------------------------- terminal output


class _Progress:
    """A one-line bar redrawn on a terminal; elsewhere one line per level when it ends."""

    def __init__(self, out: TextIO, live: bool, concurrency: int, total: int | None) -> None:
        self.out, self.live, self.concurrency, self.total = out, live, concurrency, total
        self.duration: float | None = None
        self.done = self.errors = 0
        self.t0 = time.perf_counter()
        self._drawn = 0.0

    def add(self, result: RequestResult) -> None:
        self.done += 1
        self.errors += not result.ok
        self.draw()

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.live or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        elapsed = now - self.t0
        if self.duration:
            frac, count = min(1.0, elapsed / self.duration), f"{self.done} done"
        else:
            frac, count = self.done / max(1, self.total or 1), f"{self.done}/{self.total}"
        bar = "#" * int(frac * 30)
        line = f"concurrency {self.concurrency:>3} [{bar:<30}] {count}  {elapsed:5.1f} s"
        self.out.write(f"\r\x1b[K{line}  errors {self.errors}")
        self.out.flush()

    def finish(self, level: LevelResult) -> None:
        prefix = "\r\x1b[K" if self.live else ""
        self.out.write(
            f"{prefix}concurrency {level.concurrency}: {level.requests} requests in "
            f"{level.duration_s:.1f} s, {level.output_tokens_per_s:.1f} tok/s, "
            f"{level.errors} errors\n"
        )
        self.out.flush()


async def _ticking(progress: _Progress, work: Awaitable[LevelRun]) -> LevelRun:
    """``work``, with the bar redrawn meanwhile (its clock moves between results too)."""

    async def tick() -> None:
        while True:
            progress.draw(force=True)
            await asyncio.sleep(0.25)

    ticker = asyncio.ensure_future(tick()) if progress.live else None
    try:
        return await work
    finally:
        if ticker is not None:
            ticker.cancel()


# ---------------------------------------------------------------- command line


def _concurrency(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("give one or more positive integers: 1,4,16")
    return levels


def _positive(kind: type[int] | type[float], minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamabox bench",
        description="Benchmark an OpenAI-compatible server (llamabox, llama-server, vLLM, "
        "Ollama's /v1) with streaming requests at each concurrency level; prints a table, "
        "or JSON with --json.",
    )
    add = ap.add_argument
    add("--url", required=True, help="the server: http(s)://host:port, with or without /v1")
    add(
        "--concurrency",
        type=_concurrency,
        default=[1, 4, 16],
        metavar="1,4,16",
        help="concurrent clients of each level (default: 1,4,16)",
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument(
        "--requests",
        type=_positive(int, 1),
        metavar="N",
        help="requests per level (default: 4 per client)",
    )
    size.add_argument(
        "--duration",
        type=_positive(float, 0.001),
        metavar="S",
        help="instead: send requests for S seconds per level",
    )
    add(
        "--max-tokens",
        type=_positive(int, 1),
        default=128,
        metavar="N",
        help="max_tokens of each request (default: 128)",
    )
    add(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos: each request generates --max-tokens (llamabox, llama.cpp, vLLM)",
    )
    add("--chat", action="store_true", help="use /v1/chat/completions (default: /v1/completions)")
    prompt = ap.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt",
        help="send this prompt every time (default: a built-in set "
        f"of {len(BUILTIN_PROMPTS)} prompts)",
    )
    prompt.add_argument(
        "--prompt-words",
        type=_positive(int, 1),
        metavar="N",
        help="a distinct prompt of N random words per request",
    )
    add("--model", help="the model field (default: the first of GET /v1/models)")
    add("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    add("--temperature", type=_positive(float, 0.0), default=0.0, metavar="T", help="(default: 0)")
    add(
        "--warmup",
        type=_positive(int, 0),
        default=1,
        metavar="N",
        help="unmeasured requests before the first level (default: 1)",
    )
    add(
        "--timeout",
        type=_positive(float, 0.001),
        default=600.0,
        metavar="S",
        help="a request that takes longer fails (default: 600)",
    )
    add("--seed", type=int, default=0, help="of --prompt-words (default: 0)")
    add(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="write a PNG of throughput and latency against concurrency (needs matplotlib)",
    )
    add(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the table goes to stderr)",
    )
    add("--quiet", action="store_true", help="print nothing on stderr but errors")
    return ap


class _Failure(Exception):
    pass


async def _run(args: argparse.Namespace, target: Target) -> BenchReport:
    err = sys.stderr
    model = args.model or await served_model(target)
    prompts = _prompts(args)
    bodies = (_body_for(args, model, p) for p in prompts)
    if not args.quiet:
        err.write(f"benchmarking {target.origin}{target.path}, model {model or '(none given)'}\n")
    for _ in range(args.warmup):
        result = await stream_one(target, next(bodies))
        if not result.ok:
            raise _Failure(f"warm-up request failed: {result.error} (--warmup 0 skips it)")
    levels = []
    for c in args.concurrency:
        total = None if args.duration else (args.requests or 4 * c)
        if total is not None and total < c and not args.quiet:
            err.write(f"note: {total} requests at concurrency {c}: at most {total} in flight\n")
        progress = _Progress(err, err.isatty() and not args.quiet, c, total)
        progress.duration = args.duration
        level_bodies = bodies if total is None else (next(bodies) for _ in range(total))
        run = await _ticking(
            progress,
            run_level(target, c, level_bodies, duration_s=args.duration, on_result=progress.add),
        )
        level = summarize(run)
        if not args.quiet:
            progress.finish(level)
        levels.append(level)
    return BenchReport(
        url=args.url,
        endpoint=target.path,
        model=model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        prompts=(
            "custom"
            if args.prompt is not None
            else f"words:{args.prompt_words}"
            if args.prompt_words
            else "builtin"
        ),
        requests_per_level=None if args.duration else args.requests,
        duration_s=args.duration,
        warmup=args.warmup,
        levels=levels,
    )


def _run_async(coro: Coroutine[Any, Any, BenchReport]) -> BenchReport:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str]) -> int:
    """``llamabox bench ARGV``; returns the exit code (1 when a level had no success)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's usage error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2

    def fail(message: str, code: int = 1) -> int:
        print(f"llamabox bench: error: {message}", file=sys.stderr)
        return code

    try:
        target = Target.from_url(
            args.url, chat=args.chat, api_key=args.api_key, timeout_s=args.timeout
        )
    except ValueError as e:
        return fail(f"--url: {e}", 2)
    if args.plot is not None:
        try:
            load_matplotlib()
        except PlotUnavailable as e:
            return fail(str(e), 2)
        if not args.plot.parent.is_dir():
            return fail(f"--plot: no such directory: {args.plot.parent}", 2)
    try:
        report = _run_async(_run(args, target))
    except (ConnectError, _Failure) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # past the progress bar
        return fail("interrupted", 130)
    table = format_table(report.levels)
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
        if not args.quiet:
            print(table, file=sys.stderr)
    else:
        print(table)
    if args.plot is not None:
        try:
            write_plot(report, args.plot)
        except OSError as e:
            return fail(f"--plot: cannot write {args.plot}: {e.strerror or e}")
    failed = [lv.concurrency for lv in report.levels if lv.completed == 0]
    if failed:
        return fail(f"no request succeeded at concurrency {', '.join(map(str, failed))}")
    return 0
