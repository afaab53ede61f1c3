"""-tps through the real server and the official openai SDK: the delivered rate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

LIMIT = 25


@pytest.fixture(scope="module")
def paced_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    with start_server(tiny_model_path, "-np", "2", "-c", "2048", "-tps", str(LIMIT)) as server:
        yield server


def _delivered_rate(server: ServerProcess, n: int, headers: dict[str, str] | None = None) -> float:
    """Tokens a second from the first streamed token to the last (a chunk may carry several:
    logprobs says how many)."""
    client = server.openai()
    stream = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=n, stream=True, logprobs=1,
        extra_body={"ignore_eos": True}, extra_headers=headers or {},
    )  # fmt: skip
    arrivals = []  # (time, tokens in the chunk)
    for chunk in stream:
        logprobs = chunk.choices[0].logprobs if chunk.choices else None
        if logprobs and logprobs.tokens:
            arrivals.append((time.monotonic(), len(logprobs.tokens)))
    assert sum(k for _, k in arrivals) == n and len(arrivals) >= 3
    # Chunk i leaves the server when the tokens before it are due: the rate between the second
    # chunk and the last (the first one's arrival also carries the response's start).
    before = [sum(k for _, k in arrivals[:i]) for i in range(len(arrivals))]
    return (before[-1] - before[1]) / (arrivals[-1][0] - arrivals[1][0])


def test_the_server_limit_bounds_the_delivered_rate(paced_server: ServerProcess) -> None:
    rate = _delivered_rate(paced_server, 30)
    # Never above the limit (pacing's sleeps guarantee it); the lower bound only says that
    # pacing did not stall (the tiny model decodes thousands of tokens a second here).
    assert LIMIT * 0.4 < rate <= LIMIT * 1.05, rate


def test_a_request_asks_for_less_with_its_header(paced_server: ServerProcess) -> None:
    rate = _delivered_rate(paced_server, 12, {"X-Request-Tokens-Per-Second": "8"})
    assert 8 * 0.4 < rate <= 8 * 1.05, rate
    rate = _delivered_rate(paced_server, 20, {"X-Request-Tokens-Per-Second": "1000"})
    assert rate <= LIMIT * 1.05, rate  # never more than the server's limit


def test_a_bad_header_is_a_400(paced_server: ServerProcess) -> None:
    with paced_server.http() as http:
        r = http.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 2},
            headers={"X-Request-Tokens-Per-Second": "lots"},
        )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "X-Request-Tokens-Per-Second"
