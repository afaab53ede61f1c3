"""Speculative decoding: speedup over plain decoding, llamabox and llama-server side by side.

Both servers run plain decoding all along; for each drafting type a second pair starts with the
same flags plus that type, and each workload is sent to the four in turn (plain and the mode
next to each other, in the same minutes; the order reverses on the next repeat). Reported per
server and mode: generated tokens per second at each concurrency, the speedup over the same
server's plain decoding measured alongside, the draft
acceptance (from the responses' timings), and whether the greedy text equals plain decoding's.

Workloads:
  copy    Gemma 3 270M: rewrite a long code listing (n-gram drafts hit)
  free    Gemma 3 270M: free text (n-gram drafts mostly miss: no slowdown expected)
  code    the Qwen2.5-Coder pair: code completion (1.5B target, 0.5B draft)
  chat    the Qwen2.5-Coder pair: a chat answer

    python bench/spec.py --suite ngram --threads 1
    python bench/spec.py --suite draft --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import build_llama_tools, log
from servers import SERVERS, Server, free_port, pair_commands, start_both, stop_server

LISTING = '''\
def parse_config(path):
    """Read a key = value file into a dict, skipping comments and blank lines."""
    config = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{number}: expected key = value, got {line!r}")
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not key:
                raise ValueError(f"{path}:{number}: empty key")
            if key in config:
                raise ValueError(f"{path}:{number}: duplicate key {key!r}")
            if value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif value.isdigit():
                value = int(value)
            config[key] = value
    return config


def merge_configs(base, override):
    """Values of override win; nested dicts are merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged
'''

COPY_PROMPT = (
    "Here is a Python module:\n\n" + LISTING + "\nThe same module, with parse_config renamed "
    "to read_config and nothing else changed:\n\n"
    + LISTING.replace("def parse_config", "def read_config", 1)[:40]
)
FREE_PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"
CODE_PROMPT = (
    "<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n<|im_start|>user\n"
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a "
    "docstring and type hints.<|im_end|>\n<|im_start|>assistant\n"
)
CHAT_MESSAGES = [{"role": "user", "content": "Explain in a few paragraphs how a hash map works."}]

SUITES: dict[str, dict[str, Any]] = {
    "ngram": {
        "modes": {
            "plain": [],
            "ngram-simple": ["--spec-type", "ngram-simple"],
            "ngram-map-k": ["--spec-type", "ngram-map-k"],
            "ngram-mod": ["--spec-type", "ngram-mod"],
        },
        "workloads": ("copy", "free"),
    },
    "draft": {
        "modes": {"plain": [], "draft": ["--spec-type", "draft-simple", "-md", "{draft}"]},
        "workloads": ("code", "chat"),
    },
}


@dataclass
class Result:
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def one(
    client: httpx.AsyncClient, url: str, workload: str, n_predict: int
) -> tuple[str, int, int, int, float, float]:
    """(text, tokens, drafted, accepted, first-token time, end time) of one request; the
    first-token time is the end less the server's own decode time (timings.predicted_ms)."""
    if workload == "chat":
        body = {"messages": CHAT_MESSAGES, "max_tokens": n_predict, "temperature": 0}
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        j = r.json()
        text, n = j["choices"][0]["message"]["content"], j["usage"]["completion_tokens"]
    else:
        prompt = {"copy": COPY_PROMPT, "free": FREE_PROMPT, "code": CODE_PROMPT}[workload]
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "cache_prompt": True}
        r = await client.post(url + "/completion", json=body)
        r.raise_for_status()
        j = r.json()
        text, n = j["content"], j["tokens_predicted"]
    t = j.get("timings", {})
    end = time.perf_counter()
    first = end - float(t.get("predicted_ms", 0.0)) / 1e3
    return text, n, int(t.get("draft_n", 0)), int(t.get("draft_n_accepted", 0)), first, end


async def measure(url: str, workload: str, conc: int, n_predict: int) -> Result:
    res = Result()
    async with httpx.AsyncClient(timeout=3600) as client:
        # Each of the `conc` slots gets the prompt into its cache first: the measured run then
        # decodes (almost) only generated tokens, in both servers.
        await asyncio.gather(*(one(client, url, workload, 1) for _ in range(conc)))
        outs = await asyncio.gather(*(one(client, url, workload, n_predict) for _ in range(conc)))
    # Decode throughput: all tokens over the window from the first first-token to the last end
    # (the prompts' prefill, the same with drafts or without, is left out).
    res.seconds = max(o[5] for o in outs) - min(o[4] for o in outs)
    for text, n, d, a, _, _ in outs:
        res.tokens += n
        res.drafted += d
        res.accepted += a
        res.texts.append(text)
    return res


async def amain(args: argparse.Namespace) -> int:
    suite = SUITES[args.suite]
    if args.suite == "ngram":
        from llamabox.models import default_model_path

        model, draft = Path(args.model or default_model_path()), None
    else:
        from llamabox.models import qwen_draft_path, qwen_target_path

        model, draft = Path(args.model or qwen_target_path()), Path(args.draft or qwen_draft_path())
    llama_server = build_llama_tools()["llama-server"]
    concs = [int(c) for c in args.conc.split(",")]
    rows: list[dict[str, Any]] = []
    modes = args.modes.split(",") if args.modes else list(suite["modes"])
    modes = [m for m in modes if m != "plain"]

    async def start(mode: str) -> dict[str, Server]:
        flags = [f.format(draft=draft) for f in suite["modes"][mode]]
        common = ["-m", str(model), "-c", str(args.ctx * max(concs)), "-np", str(max(concs)),
                  "-t", str(args.threads), "-tb", str(args.threads), *flags]  # fmt: skip
        ports = {"llamabox": free_port(), "llama-server": free_port()}
        servers = await start_both(
            pair_commands(llama_server, common, ports), ports, f"spec-{mode}"
        )
        async with httpx.AsyncClient(timeout=3600) as client:
            for workload in suite["workloads"]:  # warm-up: the same work, once each
                for server in servers.values():
                    await one(client, server.url, workload, 32)
        return servers

    # Plain decoding runs all along, and is measured next to each mode, in the same minutes:
    # on a shared machine throughput drifts by 10-20 % from one minute to the next.
    plain = await start("plain")
    try:
        for mode in modes:
            servers = await start(mode)
            try:
                for workload in suite["workloads"]:
                    for conc in concs:
                        samples: dict[tuple[str, str], list[Result]] = {}
                        for rep in range(args.repeat):
                            order = [(n, m) for n in SERVERS for m in ("plain", mode)]
                            for name, m in order if rep % 2 == 0 else reversed(order):
                                url = (plain if m == "plain" else servers)[name].url
                                r = await measure(url, workload, conc, args.n_predict)
                                samples.setdefault((name, m), []).append(r)
                        for name in SERVERS:
                            base, rs = samples[(name, "plain")], samples[(name, mode)]
                            best, base_best = max(rs, key=lambda r: r.tps), base[0]
                            tps = statistics.median(r.tps for r in rs)
                            tps_plain = statistics.median(r.tps for r in base)
                            row = {
                                "server": name, "mode": mode, "workload": workload, "conc": conc,
                                "tok_s": round(tps, 2), "plain_tok_s": round(tps_plain, 2),
                                "speedup": round(tps / tps_plain, 3) if tps_plain else None,
                                "acceptance": (
                                    round(best.accepted / best.drafted, 3) if best.drafted else None
                                ),
                                "drafted": best.drafted,
                                "same_text": base_best.texts == best.texts,
                            }  # fmt: skip
                            rows.append(row)
                            log(json.dumps(row))
            finally:
                for srv in servers.values():
                    stop_server(srv)
    finally:
        for srv in plain.values():
            stop_server(srv)
    print(f"{'mode':14} {'workload':8} {'conc':>4} {'llamabox':>9} {'llama-srv':>9} {'ratio':>6} "
          f"{'lb x':>6} {'ls x':>6} {'lb acc':>6} {'ls acc':>6} same")  # fmt: skip
    by = {(r["server"], r["mode"], r["workload"], r["conc"]): r for r in rows}
    for (name, mode, workload, conc), r in by.items():
        if name != "llamabox":
            continue
        o = by[("llama-server", mode, workload, conc)]
        ratio = r["tok_s"] / o["tok_s"] if o["tok_s"] else float("nan")
        print(f"{mode:14} {workload:8} {conc:>4} {r['tok_s']:>9.2f} {o['tok_s']:>9.2f} "
              f"{ratio:>6.2f} {r['speedup'] or 0:>6.2f} {o['speedup'] or 0:>6.2f} "
              f"{r['acceptance'] or 0:>6.2f} {o['acceptance'] or 0:>6.2f} "
              f"{r['same_text']}/{o['same_text']}")  # fmt: skip
    print(json.dumps({"bench": "spec", "suite": args.suite, "threads": args.threads, "rows": rows}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="ngram")
    ap.add_argument("--model", help="target GGUF (default: Gemma for ngram, Qwen 1.5B for draft)")
    ap.add_argument("--draft", help="draft GGUF (default: Qwen2.5-Coder 0.5B)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conc", default="1,4,16", help="concurrencies (default 1,4,16)")
    ap.add_argument("--n-predict", type=int, default=192)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--modes", help="comma-separated subset of the suite's modes (plain first)")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
