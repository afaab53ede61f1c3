"""Slot save, erase and restore through the real server (tiny model): a restored slot makes
the next request with its prefix a cache hit, with the same greedy output."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

PROMPT = "The history of the city begins with a small settlement on the river, " * 6
BODY = {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True}


@pytest.fixture(scope="module")
def slot_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="llamabox-slots-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, slot_dir: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "1", "-c", "8192", "--slot-save-path", str(slot_dir)]
    with start_server(tiny_model_path, *flags) as s:
        yield s


def _complete(http: httpx.Client) -> tuple[list[int], int, int]:
    r = http.post("/completion", json=BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["tokens"], body["tokens_cached"], body["tokens_evaluated"]


def test_a_restored_slot_is_a_prefix_hit(server: ServerProcess, slot_dir: Path) -> None:
    with server.http() as http:
        tokens, cached, n_prompt = _complete(http)
        assert cached == 0 and n_prompt > 60
        r = http.post("/slots/0?action=save", json={"filename": "history.bin"})
        assert r.status_code == 200, r.text
        saved = r.json()
        assert saved["n_saved"] >= n_prompt and saved["n_written"] > 0
        assert (slot_dir / "history.bin").stat().st_size > 0

        r = http.post("/slots/0?action=erase")
        assert r.status_code == 200 and r.json()["n_erased"] == saved["n_saved"]
        again, cached, _ = _complete(http)  # the erased slot: computed anew
        assert cached == 0 and again == tokens

        assert http.post("/slots/0?action=erase").status_code == 200
        r = http.post("/slots/0?action=restore", json={"filename": "history.bin"})
        assert r.status_code == 200, r.text
        assert r.json()["n_restored"] == saved["n_saved"] and r.json()["n_read"] > 0
        restored, cached, _ = _complete(http)
        assert cached == n_prompt - 1  # all of the prompt but its last token, from the file
        assert restored == tokens


def test_bad_files_are_400s_and_the_server_stays_up(server: ServerProcess, slot_dir: Path) -> None:
    (slot_dir / "junk.bin").write_bytes(b"not a llama.cpp state file")
    with server.http() as http:
        r = http.post("/slots/0?action=restore", json={"filename": "junk.bin"})
        assert r.status_code == 400 and "cannot restore slot 0" in r.json()["error"]["message"]
        for name in ("../outside.bin", "missing.bin"):
            r = http.post("/slots/0?action=restore", json={"filename": name})
            assert r.status_code == 400 and r.json()["error"]["param"] == "filename"
        r = http.post("/slots/5?action=save", json={"filename": "x.bin"})
        assert r.status_code == 400 and "no slot 5" in r.json()["error"]["message"]
        _, cached, _ = _complete(http)  # a failed restore left the slot empty, and it serves
        assert cached == 0


def test_a_busy_slot_is_refused(server: ServerProcess) -> None:
    long = {"prompt": "x", "n_predict": 8000, "ignore_eos": True, "stream": True}
    answers = []
    with server.http() as http, http.stream("POST", "/completion", json=long) as stream:
        lines = stream.iter_lines()
        next(lines)  # generating now (for a few seconds: 8,000 tokens)
        r = httpx.post(f"{server.base_url}/slots/0?action=save", json={"filename": "b.bin"})
        answers.append((r.status_code, r.json()))
        for _ in lines:
            pass
    status, body = answers[0]
    assert status == 400 and "busy" in body["error"]["message"], body
