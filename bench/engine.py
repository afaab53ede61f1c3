"""The llamabox engine in-process versus llama.cpp's ``llama-batched-bench``, side by side.

    python bench/engine.py [--model GGUF] [--npl 1,2,4,8,16] [--npp 128] [--ntg 128]
                           [--threads N] [--repeat 2] [--ctx 8192]

For each parallelism N (``--npl``) and each repeat: one run of ``llama-batched-bench -npl N`` and
one run of the llamabox engine with ``n_parallel = N``, alternating which goes first, so both see
the same machine load. Same model, threads, context (``-c``), ``n_batch`` 2048, ``n_ubatch`` 512
and flash-attention setting (auto) on both sides. The figures of each side are the median over
the repeats; the ratio is llamabox / llama.cpp of those medians.

Definitions follow ``tools/batched-bench/batched-bench.cpp`` (prompts not shared, the N sequences
decoded together):

- PP (prompt tok/s) = N * npp / time to prefill the N prompts. llamabox: from submitting the N
  requests until every request has its first token (sampled from the prompt's logits).
- TG (generated tok/s) = N * ntg / time of ntg decode steps of N tokens each. llamabox: each
  request asks for ``ntg + 1`` tokens (ignore_eos, greedy, ``cache_prompt=False``): the first
  comes from the prefill, each of the ``ntg`` others needs one decode step; the time runs from
  the moment all first tokens are out until the last request finishes. llamabox's TG includes
  sampling, detokenization and the hand-off to asyncio; batched-bench feeds random tokens and
  samples nothing.

Prompts are distinct texts tokenized by the model and cut to exactly ``npp`` tokens (BOS
included); batched-bench uses random tokens (the cost is the same). Prints a table and a final
JSON line (``{"bench": "engine", ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORDS,
    build_llama_tools,
    default_threads,
    log,
    median,
    model_path,
    ratio,
)


@dataclass
class Sample:
    """One measurement of one side at one parallelism."""

    pp_tps: float
    tg_tps: float
    t_pp_s: float
    t_tg_s: float


@dataclass
class Row:
    npl: int
    llamabox: list[Sample] = field(default_factory=list)
    llama_cpp: list[Sample] = field(default_factory=list)

    def med(self, side: str, what: str) -> float:
        samples: list[Sample] = getattr(self, side)
        return median([float(getattr(s, what)) for s in samples])


# ---------------------------------------------------------------- llama-batched-bench


def run_batched_bench(
    exe: Path, model: Path, npl: int, npp: int, ntg: int, threads: int, ctx: int
) -> Sample:
    cmd = [
        str(exe), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
        "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl),
        "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({proc.returncode}):\n{out[-3000:]}")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rec = json.loads(line)
            if int(rec["pl"]) == npl:
                return Sample(
                    pp_tps=float(rec["speed_pp"]),
                    tg_tps=float(rec["speed_tg"]),
                    t_pp_s=float(rec["t_pp"]),
                    t_tg_s=float(rec["t_tg"]),
                )
    raise RuntimeError(f"no result row for npl={npl} in llama-batched-bench output:\n{out[-3000:]}")


# ---------------------------------------------------------------- llamabox


async def make_prompts(
    tokenize: Callable[[str], Awaitable[list[int]]], n: int, npp: int, seed: int
) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``npp`` tokens (BOS first)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [f"Story {i}:"] + [rng.choice(WORDS) for _ in range(npp * 2)]
        tokens = await tokenize(" ".join(words))
        if len(tokens) < npp:
            raise RuntimeError(f"prompt text too short: {len(tokens)} < {npp} tokens")
        prompts.append(tokens[:npp])
    return prompts


async def run_llamabox(
    model: Path, npl: int, npp: int, ntg: int, threads: int, ctx: int, seed: int
) -> Sample:
    from llamabox.engine import Engine
    from llamabox.types import EngineConfig, GenerateRequest, GenerationOutput, SamplingParams

    config = EngineConfig(
        model=str(model),
        n_parallel=npl,
        n_ctx=ctx,
        n_batch=2048,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
    )
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    async with Engine(config) as engine:
        # Warm-up, as batched-bench does one small decode before measuring.
        warm = await engine.generate(
            GenerateRequest(prompt="Hello", max_tokens=2, sampling=greedy, cache_prompt=False)
        )
        async for _ in warm:
            pass
        prompts = await make_prompts(engine.tokenize, npl, npp, seed)

        t_first: list[float] = [0.0] * npl
        t_done: list[float] = [0.0] * npl
        n_gen: list[int] = [0] * npl

        async def consume(i: int, stream: AsyncIterator[GenerationOutput]) -> None:
            async for out in stream:
                if out.token_ids and n_gen[i] == 0:
                    t_first[i] = time.perf_counter()
                n_gen[i] += len(out.token_ids)
                if out.finish_reason is not None:
                    t_done[i] = time.perf_counter()

        t0 = time.perf_counter()
        streams = [
            await engine.generate(
                GenerateRequest(prompt=p, max_tokens=ntg + 1, sampling=greedy, cache_prompt=False)
            )
            for p in prompts
        ]
        await asyncio.gather(*(consume(i, s) for i, s in enumerate(streams)))
    if any(n != ntg + 1 for n in n_gen):
        raise RuntimeError(f"llamabox generated {n_gen} tokens, expected {ntg + 1} each")
    t_pp = max(t_first) - t0
    t_tg = max(t_done) - max(t_first)
    return Sample(pp_tps=npl * npp / t_pp, tg_tps=npl * ntg / t_tg, t_pp_s=t_pp, t_tg_s=t_tg)


# ---------------------------------------------------------------- main


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'parallel':>8} | {'llamabox TG':>11} | {'llama.cpp TG':>12} | {'ratio':>5} | "
        f"{'llamabox PP':>11} | {'llama.cpp PP':>12} | {'ratio':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        lb_tg, lc_tg = r.med("llamabox", "tg_tps"), r.med("llama_cpp", "tg_tps")
        lb_pp, lc_pp = r.med("llamabox", "pp_tps"), r.med("llama_cpp", "pp_tps")
        print(
            f"{r.npl:>8} | {lb_tg:>11.1f} | {lc_tg:>12.1f} | {ratio(lb_tg, lc_tg):>5.2f} | "
            f"{lb_pp:>11.1f} | {lc_pp:>12.1f} | {ratio(lb_pp, lc_pp):>5.2f}"
        )
    print("(tok/s; medians over the repeats; ratio = llamabox / llama.cpp; target TG ratio >= 0.9)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF model (default: llamabox's default, Gemma 3 270M)")
    ap.add_argument("--npl", default="1,2,4,8,16", help="parallel sequences, comma-separated")
    ap.add_argument("--npp", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--ntg", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--threads", type=int, default=0, help="threads (default: usable CPUs)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side per parallelism")
    ap.add_argument("--ctx", type=int, default=8192, help="total context on both sides (-c)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--llamabox-only", action="store_true", help="skip llama-batched-bench (no build)"
    )
    args = ap.parse_args()

    npls = [int(x) for x in args.npl.split(",") if x.strip()]
    threads = args.threads or default_threads()
    model = model_path(args.model)
    exe = None if args.llamabox_only else build_llama_tools()["llama-batched-bench"]
    log(f"model {model}, threads {threads}, npp {args.npp}, ntg {args.ntg}, ctx {args.ctx}")

    rows = [Row(npl=n) for n in npls]
    for rep in range(args.repeat):
        for row in rows:
            order = (
                ["llama_cpp", "llamabox"] if (rep + row.npl) % 2 == 0 else ["llamabox", "llama_cpp"]
            )
            for side in order:
                if side == "llama_cpp":
                    if exe is None:
                        continue
                    s = run_batched_bench(
                        exe, model, row.npl, args.npp, args.ntg, threads, args.ctx
                    )
                    row.llama_cpp.append(s)
                else:
                    s = asyncio.run(
                        run_llamabox(
                            model, row.npl, args.npp, args.ntg, threads, args.ctx,
                            args.seed + rep,
                        )
                    )  # fmt: skip
                    row.llamabox.append(s)
                log(
                    f"rep {rep + 1}/{args.repeat} npl {row.npl:>2} {side:<9}: "
                    f"TG {s.tg_tps:7.1f} tok/s, PP {s.pp_tps:7.1f} tok/s"
                )

    print()
    print_table(rows)
    result = {
        "bench": "engine",
        "model": str(model),
        "threads": threads,
        "npp": args.npp,
        "ntg": args.ntg,
        "ctx": args.ctx,
        "repeat": args.repeat,
        "rows": [
            {
                "npl": r.npl,
                "llamabox_tg": round(r.med("llamabox", "tg_tps"), 2),
                "llama_cpp_tg": round(r.med("llama_cpp", "tg_tps"), 2),
                "tg_ratio": round(
                    ratio(r.med("llamabox", "tg_tps"), r.med("llama_cpp", "tg_tps")), 3
                ),
                "llamabox_pp": round(r.med("llamabox", "pp_tps"), 2),
                "llama_cpp_pp": round(r.med("llama_cpp", "pp_tps"), 2),
                "pp_ratio": round(
                    ratio(r.med("llamabox", "pp_tps"), r.med("llama_cpp", "pp_tps")), 3
                ),
                "samples": {
                    "llamabox": [asdict(s) for s in r.llamabox],
                    "llama_cpp": [asdict(s) for s in r.llama_cpp],
                },
            }
            for r in rows
        ],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
