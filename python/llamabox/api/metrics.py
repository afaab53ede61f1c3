"""``GET /metrics``: Prometheus text with llama.cpp's / LLaMA Box's ``llamacpp:*`` names.

Only with ``metrics=True`` (``--metrics``); otherwise 501, as llama.cpp answers.
"""

from __future__ import annotations

from llamabox.api.errors import APIError
from llamabox.api.http import Request, Response, Route
from llamabox.api.state import AppState
from llamabox.types import EngineStats

__all__ = ["render", "routes"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _rate(n: int, ms: float) -> float:
    return 1e3 * n / ms if ms > 0 else 0.0


def render(stats: EngineStats) -> str:
    kv_ratio = stats.kv_cells_used / stats.kv_cells_total if stats.kv_cells_total else 0.0
    # (name, type, help, value)
    series = [
        ("prompt_tokens_total", "counter", "Number of prompt tokens processed.",
         stats.n_prompt_tokens_total),
        ("prompt_seconds_total", "counter", "Prompt process time.",
         stats.t_prompt_ms_total / 1e3),
        ("tokens_predicted_total", "counter", "Number of generation tokens processed.",
         stats.n_tokens_predicted_total),
        ("tokens_predicted_seconds_total", "counter", "Predict process time.",
         stats.t_predicted_ms_total / 1e3),
        ("tokens_drafted_total", "counter",
         "Number of speculative decoding tokens processed.", stats.n_tokens_drafted_total),
        ("tokens_drafted_accepted_total", "counter",
         "Number of speculative decoding tokens to be accepted.",
         stats.n_tokens_drafted_accepted_total),
        # llama-server's names of the same two counters
        ("n_drafted_total", "counter", "Number of draft tokens verified.",
         stats.n_tokens_drafted_total),
        ("n_drafted_accepted_total", "counter", "Number of draft tokens accepted.",
         stats.n_tokens_drafted_accepted_total),
        ("n_decode_total", "counter", "Total number of llama_decode() calls.",
         stats.n_decode_total),
        ("requests_total", "counter", "Number of requests received.", stats.n_requests_total),
        ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
         _rate(stats.n_prompt_tokens_total, stats.t_prompt_ms_total)),
        ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
         _rate(stats.n_tokens_predicted_total, stats.t_predicted_ms_total)),
        ("kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv_ratio),
        ("kv_cache_tokens", "gauge", "KV-cache tokens.", stats.kv_cells_used),
        ("requests_processing", "gauge", "Number of requests processing.", stats.n_busy),
        ("requests_deferred", "gauge", "Number of requests deferred.", stats.n_queued),
        ("media_inputs_total", "counter", "Number of media inputs (images, audio) prepared.",
         stats.n_media_inputs_total),
        ("media_cache_hits_total", "counter",
         "Number of media inputs whose projected embeddings were cached.",
         stats.n_media_cache_hits_total),
        ("media_encoded_total", "counter", "Number of media inputs encoded by the projector.",
         stats.n_media_encoded_total),
        ("media_encode_seconds_total", "counter", "Media encode time.",
         stats.t_media_encode_ms_total / 1e3),
        ("media_cache_entries", "gauge", "Projected embeddings kept (--max-projected-cache).",
         stats.n_media_cache_entries),
        ("media_decodes_total", "counter", "Number of llama_decode() calls of media embeddings.",
         stats.n_media_decodes_total),
    ]  # fmt: skip
    lines = []
    for name, kind, help_text, value in series:
        lines += [
            f"# HELP llamacpp:{name} {help_text}",
            f"# TYPE llamacpp:{name} {kind}",
            f"llamacpp:{name} {value:g}"
            if isinstance(value, float)
            else f"llamacpp:{name} {value}",
        ]
    return "\n".join(lines) + "\n"


async def metrics(req: Request, state: AppState) -> Response:
    if not state.config.metrics:
        raise APIError(
            501, "This server does not support metrics endpoint. Start it with `--metrics`"
        )
    return Response(render(state.engine.stats()).encode(), content_type=CONTENT_TYPE)


def routes() -> list[Route[AppState]]:
    return [Route("GET", "/metrics", metrics, autoload=False)]  # a scrape never loads a model
