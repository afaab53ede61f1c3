"""``llamabox bench`` against a real server on the tiny model, and against a scripted fake.

Timings on a shared 2-core machine say nothing, so these check structure and consistency: the
JSON shape, tokens equal to what the server reports, ordered percentiles, TTFT within E2E,
errors counted with their messages, and clear failures. README_COMMANDS are the commands the
README shows; each runs here with only the URL (and the model name) swapped.
"""

from __future__ import annotations

import http.server
import json
import shlex
import socketserver
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamabox import benchmark
from llamabox.cli import main as cli_main
from tests.integration.server_fixtures import API_KEY, ServerProcess, free_port, start_server

pytestmark = [pytest.mark.integration]

README_URL = "http://127.0.0.1:8080"
README_OLLAMA_URL = "http://127.0.0.1:11434/v1"
README_COMMANDS = {
    "plot": "llamabox bench --url http://127.0.0.1:8080 --concurrency 1,4,16 --max-tokens 32 "
    "--ignore-eos --plot bench.png",
    "json": "llamabox bench --url http://127.0.0.1:8080 --chat --concurrency 8 --duration 2 --json",
    "ollama": "llamabox bench --url http://127.0.0.1:11434/v1 --model gemma3:270m --chat "
    "--concurrency 1,4",
}

TOP_KEYS = {
    "schema", "url", "endpoint", "model", "max_tokens", "temperature", "ignore_eos", "prompts",
    "requests_per_level", "duration_s", "warmup", "levels",
}  # fmt: skip
LEVEL_KEYS = {
    "concurrency", "requests", "completed", "errors", "duration_s", "requests_per_s",
    "output_tokens_per_s", "output_tokens", "input_tokens", "tokens_counted_by", "ttft_ms",
    "itl_ms", "tpot_ms", "e2e_ms", "error_messages",
}  # fmt: skip
DIST_KEYS = ["mean", "p50", "p90", "p95", "p99", "max"]


def _llamabox() -> list[str]:
    """The console script next to this interpreter, else ``python -m llamabox``."""
    script = Path(sys.executable).with_name("llamabox")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llamabox"]


def _bench(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_llamabox(), "bench", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _readme(name: str, url: str, **swap: str) -> list[str]:
    args = shlex.split(README_COMMANDS[name])
    assert args[:2] == ["llamabox", "bench"]
    args = [url if a in (README_URL, README_OLLAMA_URL) else swap.get(a, a) for a in args[2:]]
    return args


def _predicted(server: ServerProcess) -> int:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    [line] = [ln for ln in text.splitlines() if ln.startswith("llamacpp:tokens_predicted_total")]
    return int(float(line.split()[-1]))


def _check_level(level: dict[str, Any]) -> None:
    """What holds for any level with at least one completed request."""
    assert set(level) == LEVEL_KEYS
    assert level["requests"] == level["completed"] + level["errors"]
    assert level["completed"] > 0 and level["duration_s"] > 0
    assert level["output_tokens"] > 0 and level["output_tokens_per_s"] > 0
    assert level["requests_per_s"] > 0
    assert level["output_tokens_per_s"] == pytest.approx(
        level["output_tokens"] / level["duration_s"]
    )
    assert level["requests_per_s"] == pytest.approx(level["completed"] / level["duration_s"])
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        dist = level[name]
        assert list(dist) == DIST_KEYS
        if name in ("ttft_ms", "e2e_ms"):  # itl/tpot are empty when every stream is one chunk
            assert all(v is not None for v in dist.values()), (name, dist)
        if dist["p50"] is not None:
            qs = [dist[k] for k in ("p50", "p90", "p95", "p99", "max")]
            assert 0 <= qs[0] and qs == sorted(qs), (name, dist)
            assert dist["mean"] <= dist["max"]
    ttft, e2e = level["ttft_ms"], level["e2e_ms"]
    # each request's TTFT is at most its E2E, so every order statistic is too
    assert all(ttft[k] <= e2e[k] for k in DIST_KEYS if k != "mean"), (ttft, e2e)
    assert e2e["max"] <= level["duration_s"] * 1000


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    """No API key (the README's commands run as shown), metrics for the token count."""
    flags = ["-np", "4", "-c", "4096", "-a", "tiny", "--metrics", "--threads", "1"]
    with start_server(tiny_model_path, *flags) as s:
        yield s


def test_json_shape_tokens_and_plot(server: ServerProcess, tmp_path: Path) -> None:
    before = _predicted(server)
    plot = tmp_path / "bench.png"
    args = ["--url", server.base_url, "--concurrency", "1,2", "--requests", "4"]
    args += ["--max-tokens", "8", "--ignore-eos", "--json", "--plot", str(plot)]
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is the JSON alone; the table went to stderr
    assert set(report) == TOP_KEYS
    assert report["schema"] == benchmark.SCHEMA
    assert report["endpoint"] == "/v1/completions" and report["model"] == "tiny"
    assert report["max_tokens"] == 8 and report["requests_per_level"] == 4
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        _check_level(level)
        assert (level["requests"], level["completed"], level["errors"]) == (4, 4, 0)
        assert level["error_messages"] == {}
        assert level["tokens_counted_by"] == "usage"
        assert level["output_tokens"] == 4 * 8  # usage; ignore_eos makes it exactly max_tokens
        assert level["input_tokens"] > 0
    # and the server counted the same tokens: 8 requests and the warm-up, 8 tokens each
    assert _predicted(server) - before == (4 + 4 + 1) * 8
    assert "TTFT ms p50" in proc.stderr
    width, height = _png_size(plot)
    assert width > 300 and height > 200


def test_readme_plot_command(server: ServerProcess, tmp_path: Path) -> None:
    proc = _bench(*_readme("plot", server.base_url), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(tmp_path / "bench.png")[0] > 0
    rows = [ln.split()[:3] for ln in proc.stdout.splitlines() if ln.split()[:1] != []]
    rows = [row for row in rows if row[0].isdigit()]
    # concurrency, requests (4 per client by default), errors
    assert rows == [["1", "4", "0"], ["4", "16", "0"], ["16", "64", "0"]]


def test_readme_json_command_chat_duration(server: ServerProcess) -> None:
    proc = _bench(*_readme("json", server.base_url))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["endpoint"] == "/v1/chat/completions"
    assert report["duration_s"] == 2 and report["requests_per_level"] is None
    [level] = report["levels"]
    _check_level(level)
    assert level["concurrency"] == 8 and level["errors"] == 0
    assert level["tokens_counted_by"] == "usage"


def test_readme_ollama_command_v1_url_and_model(server: ServerProcess) -> None:
    proc = _bench(*_readme("ollama", server.base_url + "/v1", **{"gemma3:270m": "tiny"}))
    assert proc.returncode == 0, proc.stderr
    assert "/v1/chat/completions, model tiny" in proc.stderr
    assert " 4    16    0 " in proc.stdout  # concurrency 4: 16 requests, no error


def test_main_in_process_with_api_key(
    tiny_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--url", tiny_server.base_url, "--api-key", API_KEY, "--chat"]
    args += ["--concurrency", "2", "--requests", "3", "--max-tokens", "4", "--prompt", "Hi"]
    assert cli_main([*args, "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert out.err == ""  # --quiet: no progress and no table
    assert report["prompts"] == "custom"
    [level] = report["levels"]
    _check_level(level)
    assert level["completed"] == 3 and level["output_tokens"] <= 3 * 4


def test_server_errors_are_counted(tiny_server: ServerProcess) -> None:
    """Without the API key every request is a 401: counted, reported, and the exit code is 1."""
    args = ["--url", tiny_server.base_url, "--concurrency", "1,2", "--requests", "2"]
    proc = _bench(*args, "--warmup", "0", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    for level in report["levels"]:
        assert (level["requests"], level["completed"], level["errors"]) == (2, 0, 2)
        [(message, count)] = level["error_messages"].items()
        assert message.startswith("HTTP 401: ") and count == 2
        assert level["output_tokens"] == 0 and level["ttft_ms"]["p50"] is None
    assert "no request succeeded at concurrency 1, 2" in proc.stderr
    assert "2 x HTTP 401" in proc.stderr  # the table lists the messages

    proc = _bench(*args)  # the warm-up fails first, and says so
    assert proc.returncode == 1 and proc.stdout == ""
    assert "error: warm-up request failed: HTTP 401" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = _bench("--url", url, "--requests", "1")
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"llamabox bench: error: cannot connect to {url}: " in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "ftp://x"], "--url: not an http:// or https:// URL"),
        (["--url", "http://h/v1/chat/completions"], "base URL"),
        (["--url", "http://h", "--concurrency", "0"], "positive integers"),
        (["--url", "http://h", "--requests", "2", "--duration", "1"], "not allowed with"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark.main(args) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    url = f"http://127.0.0.1:{free_port()}"  # checked before any request
    assert benchmark.main(["--url", url, "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib: pip install 'llamabox[bench]'" in err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.unit
def test_sse_parser_split_anywhere() -> None:
    stream = (
        b': comment\r\ndata: {"a": 1}\r\n\r\ndata:{"b"\n'
        b"data: : 2}\n\nevent: x\nid: 3\ndata: [DONE]\n\ndata: tail"
    )
    expected = [b'{"a": 1}', b'{"b"\n: 2}', b"[DONE]", b"tail"]
    for size in (1, 2, 7, len(stream)):
        parser = benchmark.SSEParser()
        events = [e for i in range(0, len(stream), size) for e in parser.feed(stream[i : i + size])]
        assert events + parser.close() == expected


# ---- a scripted server: no usage, an HTTP error, an error event mid-stream ----


class _Scripted(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection
    count = 0
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # no /v1/models: the report's model is then null
        self._send(404, b'{"error": {"message": "no such route"}}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            n, _Scripted.count = _Scripted.count, _Scripted.count + 1
        if n % 3 == 1:
            self._send(500, b'{"error": {"message": "boom", "type": "server_error"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        text = [b'data: {"choices": [{"text": "t%d"}]}\n\n' % i for i in range(3)]
        if n % 3 == 2:
            text[1:] = [b'data: {"error": {"message": "engine failed", "code": 500}}\n\n']
        else:  # the first event in two chunks, the others in one; no usage
            text = [text[0][:9], text[0][9:], text[1] + text[2] + b"data: [DONE]\n\n"]
        for piece in text:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def scripted() -> Iterator[str]:
    _Scripted.count = 0
    httpd = _ThreadingServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_chunk_count_without_usage_and_error_kinds(
    scripted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--url", scripted, "--concurrency", "1", "--requests", "6", "--warmup", "0"]
    assert benchmark.main([*args, "--json"]) == 0  # some requests succeeded
    report = json.loads(capsys.readouterr().out)
    assert report["model"] is None
    [level] = report["levels"]
    _check_level(level)
    assert (level["completed"], level["errors"]) == (2, 4)
    assert level["tokens_counted_by"] == "chunks" and level["output_tokens"] == 2 * 3
    assert level["input_tokens"] == 0
    assert level["error_messages"] == {"HTTP 500: boom": 2, "stream error: engine failed": 2}
