"""Several models behind one real server (--models-dir), through the official openai SDK: each
request's model answers, a load past --models-max unloads the least recently used one, and
/models, /models/load and /models/unload say and change what is loaded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures import make_tiny_llama
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

NAMES = ("alpha", "beta", "gamma")
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Hello"}
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(NAMES):
        make_tiny_llama(models / f"{name}.gguf", seed=seed)
    make_tiny_llama(models / "mmproj-alpha.gguf")  # not a model on its own: not listed
    flags = ["--models-dir", str(models), "--models-max", "2", "-c", "1024", "-np", "2"]
    with start_server(None, *flags) as server:
        yield server


def _states(http: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in http.get("/models").json()["data"]}


def _until_state(http: httpx.Client, name: str, value: str) -> None:
    deadline = time.monotonic() + 30
    while _states(http)[name] != value:
        assert time.monotonic() < deadline, f"{name} never {value}: {_states(http)}"
        time.sleep(0.02)


def test_each_model_answers_and_a_third_load_evicts_the_least_recently_used(
    server: ServerProcess,
) -> None:
    client = server.openai()
    with server.http() as http:
        assert [m.id for m in client.models.list()] == list(NAMES)
        assert _states(http) == dict.fromkeys(NAMES, "unloaded")  # none loads before asked
        assert http.get("/health").status_code == 200

        out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4)
        assert out.model == "alpha" and out.usage is not None
        assert out.usage.completion_tokens >= 1
        stream = client.chat.completions.create(
            model="beta", messages=MESSAGES, max_tokens=4, stream=True
        )
        assert {chunk.model for chunk in stream} == {"beta"}
        assert _states(http) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}

        client.completions.create(model="beta", prompt="Hi", max_tokens=2)  # alpha: now LRU
        out3 = client.completions.create(model="gamma", prompt="Hi", max_tokens=2)
        assert out3.model == "gamma"
        assert _states(http) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
        assert server.wait_for_log("model alpha unloaded (least recently used, to load gamma)")

        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
        assert e.value.code == "model_not_found"

        # the router's control: unload one, load another (the load answers at once)
        assert http.post("/models/unload", json={"model": "beta"}).json() == {"success": True}
        assert _states(http)["beta"] == "unloaded"
        assert http.post("/models/load", json={"model": "alpha"}).json() == {"success": True}
        _until_state(http, "alpha", "loaded")
        r = http.post("/models/load", json={"model": "alpha"})
        assert r.status_code == 400
        assert http.post("/models/load", json={"model": "delta"}).status_code == 404
        out = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2)
        assert out.model == "alpha"
        # Ollama's keep_alive 0: unloaded right after the answer
        r = http.post(
            "/api/generate",
            json={"model": "gamma", "prompt": "Hi", "stream": False, "keep_alive": 0,
                  "options": {"num_predict": 2}},
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == "gamma"
        _until_state(http, "gamma", "unloaded")
    assert "Traceback" not in server.log()


def test_a_model_that_fails_to_load_leaves_the_others_serving(
    server: ServerProcess, tmp_path: Path
) -> None:
    models = tmp_path / "m"
    models.mkdir()
    make_tiny_llama(models / "good.gguf")
    (models / "broken.gguf").write_bytes(b"GGUF but not really")
    with start_server(None, "--models-dir", str(models), "-c", "512", "-np", "1") as other:
        client = other.openai()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="broken", prompt="Hi", max_tokens=2)
        assert "failed to load" in str(e.value)
        out = client.completions.create(model="good", prompt="Hi", max_tokens=2)
        assert out.model == "good"
        with other.http() as http:
            broken = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == "broken")
            assert broken["status"]["value"] == "unloaded" and broken["status"]["failed"]
            assert http.get("/health").status_code == 200
