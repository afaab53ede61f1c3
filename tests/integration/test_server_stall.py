"""No blocking work on the event loop: a streaming client keeps getting its tokens while other
clients send a huge prompt, a huge chat message and a large JSON schema.

Tokenizing ~600 kB of text takes a few hundred milliseconds, and so does turning a 500-property
schema into a grammar; done on the asyncio loop, they stall every stream for that long. Done off
the loop (C++ with the GIL released, on low-priority threads) the stream's gaps stay close to its
normal inter-token gap. The bound is derived from the stream's own pace on this machine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
# About 140k tokens of the tiny model's vocabulary (100k for Gemma's): far past the context,
# so the answer is a 400, but only after the whole text is tokenized.
BIG_TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(100_000))
SCHEMA = {
    "type": "object",
    "properties": {f"field_{i}": {"type": "string"} for i in range(500)},
    "required": [f"field_{i}" for i in range(500)],
}
# A gap is a stall when it is this many times the stream's normal gap, and at least this long.
# Measured here (2 cores): 15-40 ms typical and up to ~200 ms now and then, whatever the
# workers' priority (even at nice 19: not the loop, and not their CPU), against 514-578 ms when
# the work ran on the loop. llama-server, in bench/stall.py: 36-210 ms.
STALL_FACTOR = 20
STALL_FLOOR_S = 0.3


@pytest.fixture(scope="module")
def server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "2", "-c", "131072", "--max-body-size", "8M"]  # a long stream: 64k a slot
    with start_server(tiny_model_path, *flags) as server:
        yield server


# The streaming client runs in a process of its own: in this one, the GIL that the heavy
# requests' JSON encoding holds would delay it, and that is not the server's stall.
_STREAMER = """
import json, signal, sys, time, httpx
url, max_tokens, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True}
times = []
with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
    for line in r.iter_lines():
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
            times.append(time.monotonic())
            if len(times) == 1:
                print("started", flush=True)
            if stop or (seconds and times[-1] - times[0] > seconds):
                break  # disconnects: the server cancels the rest
print(json.dumps(times), flush=True)
"""


def _start_stream(server: ServerProcess, max_tokens: int, seconds: float) -> subprocess.Popen[str]:
    """A streaming client; its first line of output is "started", its last the chunk times
    (time.monotonic(), comparable across processes)."""
    args = [sys.executable, "-c", _STREAMER, server.base_url, str(max_tokens), str(seconds)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def _stream_times(proc: subprocess.Popen[str]) -> list[float]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    times: list[float] = json.loads(out.splitlines()[-1])
    return times


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _heavy_requests(server: ServerProcess) -> list[tuple[str, int, float]]:
    """(what, status, seconds) of each heavy request, sent one after the other."""
    cases = [
        ("completion of 600 kB", "/v1/completions", {"prompt": BIG_TEXT, "max_tokens": 1}),
        (
            "chat message of 600 kB",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": BIG_TEXT}], "max_tokens": 1},
        ),
        (
            "500-property schema",
            "/v1/completions",
            {"prompt": "x", "max_tokens": 1, "json_schema": SCHEMA},
        ),
        ("tokenize 600 kB", "/tokenize", {"content": BIG_TEXT}),
    ]
    out = []
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for what, path, body in cases:
            content = json.dumps(body).encode()
            t0 = time.monotonic()
            r = http.post(path, content=content)
            out.append((what, r.status_code, time.monotonic() - t0))
    return out


def test_streams_do_not_stall_while_others_send_heavy_requests(server: ServerProcess) -> None:
    # The stream's own pace, alone (past its first chunks; a reader that lags gets several
    # tokens a chunk, so there may be fewer chunks than tokens).
    alone = _gaps(_stream_times(_start_stream(server, 400, 0))[10:])
    assert len(alone) >= 10, f"{len(alone) + 11} chunks for 400 tokens"
    normal = statistics.median(alone)
    bound = max(STALL_FACTOR * normal, STALL_FLOOR_S)

    streamer = _start_stream(server, 1_000_000, 60)
    assert streamer.stdout is not None and streamer.stdout.readline().strip() == "started"
    time.sleep(0.2)
    t_heavy = time.monotonic()
    heavy = _heavy_requests(server)
    t_done = time.monotonic()
    streamer.terminate()  # it stops reading and reports
    out, _ = streamer.communicate(timeout=60)
    times: list[float] = json.loads(out.splitlines()[-1]) if out.strip() else []
    during = [b - a for a, b in zip(times, times[1:], strict=False) if t_heavy <= b <= t_done]
    report = (
        f"normal gap {1e3 * normal:.1f} ms, bound {1e3 * bound:.0f} ms; while the heavy "
        f"requests ran ({1e3 * (t_done - t_heavy):.0f} ms, "
        + ", ".join(f"{w}: {s} in {1e3 * d:.0f} ms" for w, s, d in heavy)
        + f"): {len(during)} gaps, median {1e3 * statistics.median(during):.1f} ms, "
        f"largest {1e3 * max(during):.0f} ms"
    )
    print(report)
    assert times[-1] > t_done, "the stream ended before the heavy requests did: make it longer"
    assert [s for _, s, _ in heavy] == [400, 400, 200, 200], report
    assert len(during) > 10, report
    assert max(during) < bound, report
