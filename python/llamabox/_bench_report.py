"""The results of ``llamabox bench``: their model, the statistics that make it, and how they show.

:func:`summarize` turns one concurrency level's requests (a :class:`LevelRun`) into a
:class:`LevelResult`; a :class:`BenchReport` (``--json``, schema ``SCHEMA``, described in
:mod:`llamabox.benchmark`) holds one per level. :func:`format_table` renders the levels as the
terminal table and :func:`write_plot` as a PNG (``--plot``, needs matplotlib).
:mod:`llamabox.benchmark` re-exports the public names.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from llamabox._bench_client import RequestResult

__all__ = [
    "SCHEMA",
    "BenchReport",
    "Distribution",
    "LevelResult",
    "LevelRun",
    "PlotUnavailable",
    "distribution",
    "format_table",
    "load_matplotlib",
    "summarize",
    "write_plot",
]

SCHEMA = "llamabox-bench/1"
_NAN = float("nan")


class LevelRun(msgspec.Struct, kw_only=True):
    """The raw outcome of one concurrency level."""

    concurrency: int
    results: list[RequestResult]
    wall_s: float


class Distribution(msgspec.Struct, kw_only=True):
    """Summary of one latency in milliseconds; ``None`` without samples."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class LevelResult(msgspec.Struct, kw_only=True):
    concurrency: int
    requests: int
    completed: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    output_tokens: int
    input_tokens: int
    tokens_counted_by: str  # "usage", "chunks", "mixed" or "none"
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_ms: Distribution
    error_messages: dict[str, int]


class BenchReport(msgspec.Struct, kw_only=True):
    schema: str = SCHEMA
    url: str
    endpoint: str
    model: str | None
    max_tokens: int
    temperature: float
    ignore_eos: bool
    prompts: str
    requests_per_level: int | None
    duration_s: float | None
    warmup: int
    levels: list[LevelResult]


# ---------------------------------------------------------------- statistics


def distribution(seconds: Iterable[float]) -> Distribution:
    values = np.asarray([s for s in seconds if s == s], dtype=np.float64) * 1000.0
    if values.size == 0:
        return Distribution()
    p50, p90, p95, p99 = (float(v) for v in np.percentile(values, [50, 90, 95, 99]))
    return Distribution(
        mean=float(values.mean()), p50=p50, p90=p90, p95=p95, p99=p99, max=float(values.max())
    )


def summarize(run: LevelRun) -> LevelResult:
    ok = [r for r in run.results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    by_usage = {r.tokens_from_usage for r in ok}
    counted_by = {frozenset(): "none", frozenset({True}): "usage", frozenset({False}): "chunks"}
    gaps = (b - a for r in ok for a, b in itertools.pairwise(r.chunk_times_s))
    wall = run.wall_s
    return LevelResult(
        concurrency=run.concurrency,
        requests=len(run.results),
        completed=len(ok),
        errors=len(run.results) - len(ok),
        duration_s=wall,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        output_tokens_per_s=output_tokens / wall if wall > 0 else 0.0,
        output_tokens=output_tokens,
        input_tokens=sum(r.prompt_tokens for r in ok),
        tokens_counted_by=counted_by.get(frozenset(by_usage), "mixed"),
        ttft_ms=distribution(r.ttft_s for r in ok),
        itl_ms=distribution(gaps),
        tpot_ms=distribution(r.tpot_s for r in ok),
        e2e_ms=distribution(r.e2e_s for r in ok),
        error_messages=dict(Counter(r.error for r in run.results if not r.ok).most_common(10)),
    )


# ---------------------------------------------------------------- table


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_table(levels: list[LevelResult]) -> str:
    head = (
        f"{'conc':>4} {'reqs':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} | "
        f"{'TTFT ms p50':>11} {'p90':>6} {'p99':>6} | {'ITL ms p50':>10} {'p90':>6} {'p99':>6} | "
        f"{'TPOT p50':>8} | {'E2E ms p50':>10} {'p99':>6}"
    )
    rows = [head, "-" * len(head)]
    for lv in levels:
        t, i, e = lv.ttft_ms, lv.itl_ms, lv.e2e_ms
        rows.append(
            f"{lv.concurrency:>4} {lv.requests:>5} {lv.errors:>4} {lv.requests_per_s:>7.2f} "
            f"{lv.output_tokens_per_s:>8.1f} | {_ms(t.p50):>11} {_ms(t.p90):>6} {_ms(t.p99):>6} | "
            f"{_ms(i.p50):>10} {_ms(i.p90):>6} {_ms(i.p99):>6} | {_ms(lv.tpot_ms.p50):>8} | "
            f"{_ms(e.p50):>10} {_ms(e.p99):>6}"
        )
    for lv in levels:
        for message, count in lv.error_messages.items():
            rows.append(f"concurrency {lv.concurrency}: {count} x {message}")
    return "\n".join(rows)


# ---------------------------------------------------------------- plot


class PlotUnavailable(Exception):
    pass


def load_matplotlib() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and ``FigureCanvasAgg``; raises PlotUnavailable without it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'llamabox[bench]' (or matplotlib)"
        ) from None
    return Figure, FigureCanvasAgg


def write_plot(report: BenchReport, path: Path) -> None:
    """A PNG: throughput (left) and TTFT/ITL p50/p99 (right) against concurrency."""
    figure_cls, canvas_cls = load_matplotlib()
    fig = figure_cls(figsize=(11, 4.2), dpi=100)
    canvas_cls(fig)
    left, right = fig.subplots(1, 2)
    xs = [lv.concurrency for lv in report.levels]

    def ms(values: list[float | None]) -> list[float]:
        return [_NAN if v is None else v for v in values]

    tok_s = [lv.output_tokens_per_s for lv in report.levels]
    left.plot(xs, tok_s, "o-")
    for x, y, lv in zip(xs, tok_s, report.levels, strict=True):
        rps = lv.requests_per_s
        left.annotate(
            f"{y:.0f}\n{rps:.1f} req/s" if rps < 100 else f"{y:.0f}\n{rps:.0f} req/s",
            (x, y),
            fontsize="small",
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    left.margins(x=0.12)
    left.set_ylabel("output tokens/s")
    left.set_ylim(bottom=0, top=max(tok_s, default=1.0) * 1.25 or 1.0)
    left.set_title("throughput")
    for name, dist in (("TTFT", "ttft_ms"), ("ITL", "itl_ms")):
        for q, style in (("p50", "o-"), ("p99", "^:")):
            values = ms([getattr(getattr(lv, dist), q) for lv in report.levels])
            right.plot(xs, values, style, label=f"{name} {q}")
    right.set_yscale("log")
    right.set_ylabel("ms (log)")
    right.set_title("latency")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xlabel("concurrency")
        if len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"{report.url}: POST {report.endpoint}, model {report.model or '?'}, "
        f"max_tokens {report.max_tokens}",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, format="png")
