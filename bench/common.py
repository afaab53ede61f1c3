"""Shared helpers for the benchmarks in ``bench/``.

- :func:`build_llama_tools` builds llama.cpp's ``llama-batched-bench`` and ``llama-server`` from
  the pinned source in ``vendor/llama.cpp`` into the git-ignored ``bench/build/``, with the same
  compiler switches as our module build (so ccache serves most objects).
- :func:`model_path`, :func:`default_threads`: the model and thread count both sides use.
- :func:`median`, :func:`percentile`: small statistics without numpy where it is overkill.

Only the standard library here, so ``python bench/build_llama_tools.py`` runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
BUILD_DIR = BENCH_DIR / "build"
RESULTS_DIR = BENCH_DIR / "results"
TOOLS = ("llama-batched-bench", "llama-server")

# Same switches as the module build in /CMakeLists.txt where they touch compiled code (ggml,
# libllama, common), so that ccache hits; plus the tools and the server, and no web UI (the UI
# step would otherwise try to download prebuilt assets: with both UI switches off it embeds an
# empty asset table and needs no network).
CMAKE_DEFINES: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "CMAKE_POSITION_INDEPENDENT_CODE": "ON",
    "GGML_NATIVE": "ON",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_SUBPROCESS": "OFF",
    "LLAMA_ALL_WARNINGS": "OFF",
    "LLAMA_BUILD_IS_DEV": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
}

# Filler vocabulary for synthetic prompts (distinct prompts, no shared prefix).
WORDS = (
    "river mountain quiet engine silver garden window paper orange thunder candle harbor "
    "violet market pencil winter forest bridge copper lantern meadow planet circle feather "
    "marble ocean rocket shadow velvet whistle canyon desert island jungle valley glacier "
    "the a of and to in is was for on with as by at from"
).split()


def llama_cpp_dir() -> Path:
    """The llama.cpp source tree: ``$LLAMABOX_LLAMA_CPP_DIR`` or ``vendor/llama.cpp``."""
    env = os.environ.get("LLAMABOX_LLAMA_CPP_DIR")
    return Path(env).expanduser().resolve() if env else ROOT / "vendor" / "llama.cpp"


def tool_path(name: str) -> Path:
    """Where :func:`build_llama_tools` puts the binary ``name``."""
    return BUILD_DIR / "bin" / name


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_llama_tools(jobs: int = 1, force: bool = False) -> dict[str, Path]:
    """Configure and build ``llama-batched-bench`` and ``llama-server`` into ``bench/build/``.

    Skips the build when both binaries exist (unless ``force``). Restores the pinned source with
    ``vendor/fetch.py`` when it is missing. Returns the binaries' paths.
    """
    paths = {name: tool_path(name) for name in TOOLS}
    if not force and all(p.is_file() for p in paths.values()):
        return paths
    src = llama_cpp_dir()
    if not (src / "CMakeLists.txt").is_file():
        log("llama.cpp source missing: running vendor/fetch.py")
        subprocess.run([sys.executable, str(ROOT / "vendor" / "fetch.py")], check=True)
    for exe in ("cmake", "ninja"):
        if shutil.which(exe) is None:
            raise RuntimeError(f"{exe} not found on PATH; it is needed to build llama.cpp's tools")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    if not (BUILD_DIR / "build.ninja").is_file():
        configure = ["cmake", "-S", str(src), "-B", str(BUILD_DIR), "-G", "Ninja"]
        configure += [f"-D{k}={v}" for k, v in CMAKE_DEFINES.items()]
        log("configuring: " + " ".join(configure))
        subprocess.run(configure, check=True)
    build = ["cmake", "--build", str(BUILD_DIR), "-j", str(jobs), "--target", *TOOLS]
    log("building (takes minutes on a small machine): " + " ".join(build))
    t0 = time.monotonic()
    subprocess.run(build, check=True)
    log(f"built in {time.monotonic() - t0:.0f} s")
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"build finished but binaries are missing: {missing}")
    return paths


def model_path(arg: str | None) -> Path:
    """The model to benchmark: ``arg`` if given, else llamabox's default (Gemma 3 270M)."""
    if arg:
        return Path(arg).expanduser().resolve()
    from llamabox.models import default_model_path

    return default_model_path(progress=False)


def default_threads() -> int:
    """Physical-ish core count, as llama.cpp picks by default (at least 1)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, n)


def median(xs: Sequence[float]) -> float:
    return percentile(xs, 50.0)


def percentile(xs: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def llamabox_bench(url: str, concurrency: str, requests: int, max_tokens: int) -> dict[str, Any]:
    """``llamabox bench --json`` against ``url`` (the same measuring code as the CLI)."""
    cmd = [sys.executable, "-m", "llamabox", "bench", "--url", url, "--json", "--quiet",
           "--concurrency", concurrency, "--requests", str(requests),
           "--max-tokens", str(max_tokens), "--ignore-eos"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def median_level(
    runs: Sequence[dict[str, Any]], level: int, key: str, sub: str | None = None
) -> float:
    """The median over passes of one concurrency level's ``key`` (``sub`` of it: "p50")."""
    vals = sorted(
        float(r["levels"][level][key][sub] if sub else r["levels"][level][key]) for r in runs
    )
    return vals[len(vals) // 2]


def ratio_table(
    runs: dict[str, list[dict[str, Any]]], base: str, other: str, concurrency: str
) -> list[dict[str, Any]]:
    """Prints, per concurrency level, ``other``'s output tokens/s against ``base``'s (medians
    over the passes) and TTFT p50, and returns the rows (the script's JSON)."""
    head = f"{'clients':>7} {base + ' tok/s':>14} {other + ' tok/s':>14} {'ratio':>6} "
    print(head + f"{'TTFT p50 ' + base:>17} {other:>9}")
    rows = []
    for i, c in enumerate(int(c) for c in concurrency.split(",")):
        bt, ot = (median_level(runs[n], i, "output_tokens_per_s") for n in (base, other))
        bf, of = (median_level(runs[n], i, "ttft_ms", "p50") for n in (base, other))
        rows.append({"clients": c, f"{base}_tok_s": bt, f"{other}_tok_s": ot, "ratio": ot / bt,
                     f"ttft_p50_{base}_ms": bf, f"ttft_p50_{other}_ms": of})  # fmt: skip
        print(f"{c:>7} {bt:>14.1f} {ot:>14.1f} {ot / bt:>6.2f} {bf:>17.0f} {of:>9.0f}")
    return rows


def pair_args(ap: argparse.ArgumentParser, threads: int) -> argparse.Namespace:
    """The arguments of a script that runs ``llamabox bench`` against two servers in turn
    (rpc.py, portable.py), parsed; the model defaults to Gemma 3 270M."""
    ap.add_argument("--model", help="GGUF (default: Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.model is None:
        from llamabox.models import default_model_path

        args.model = str(default_model_path())
    return args


def bench_pair(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`llamabox_bench` with :func:`pair_args`' settings."""
    return llamabox_bench(url, args.concurrency, args.requests, args.max_tokens)


# A streaming client in a process of its own (so that the heavy client's work does not delay
# it): POSTs argv[3] (JSON) to argv[1] + argv[2] with streaming on, prints "started" at its
# first text chunk, then on SIGTERM (or after argv[4] seconds) stops reading and prints the
# arrival time (time.monotonic) of every text chunk as JSON. A chunk's text is llama.cpp's
# `content` or OpenAI's `choices[0].text`.
_STREAMER = """
import json, signal, sys, time, httpx
url, path, body, seconds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
times = []
with httpx.stream("POST", url + path, json=body, timeout=300) as r:
    for line in r.iter_lines():
        if line.startswith("data: {"):
            d = json.loads(line[6:])
            if d.get("content") or (d.get("choices") or [{}])[0].get("text"):
                times.append(time.monotonic())
                if len(times) == 1:
                    print("started", flush=True)
        if stop or (times and times[-1] - times[0] > seconds):
            break
print(json.dumps(times), flush=True)
"""


class Streamer:
    """A text stream from another process; :meth:`stop` returns its chunks' arrival times."""

    def __init__(self, url: str, path: str, body: dict[str, Any], seconds: float = 300) -> None:
        args = [sys.executable, "-c", _STREAMER, url, path, json.dumps(body), str(seconds)]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "started":
            self._proc.kill()
            raise RuntimeError("the streaming client did not start")

    def stop(self) -> list[float]:
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=60)
        times: list[float] = json.loads(out.splitlines()[-1])
        return times
