"""LoRA adapters through the real server: a tiny model with a generated adapter loaded at scale
0 (--lora-init-without-apply), applied per request (`lora`) or server-wide (POST
/lora-adapters). Greedy outputs on the tiny f16 model are the same alone and batched, so a
request's output under its scales, alone, is what it must give among requests under others:
the scheduler never puts two adapter sets into one decode."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures import make_tiny_lora
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time in a small village by the sea, there lived"
OFF = [{"id": 0, "scale": 0.0}]
ON = [{"id": 0, "scale": 1.0}]
HALF = [{"id": 0, "scale": 0.5}]


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lora.gguf")


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, adapter_path: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "4", "-c", "4096", "--lora", str(adapter_path), "--lora-init-without-apply"]
    with start_server(tiny_model_path, *flags) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


def _complete(
    http: httpx.Client, lora: list[dict[str, Any]] | None, prompt: str = PROMPT
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": 12,
        "temperature": 0,
        "return_tokens": True,
    }
    if lora is not None:
        body["lora"] = lora
    r = http.post("/completion", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_adapters_listed_at_scale_zero(http: httpx.Client, adapter_path: Path) -> None:
    r = http.get("/lora-adapters")
    assert r.status_code == 200, r.text
    assert r.json() == [{"id": 0, "path": str(adapter_path), "scale": 0.0}]


def test_a_request_applies_its_own_scales(http: httpx.Client) -> None:
    base = _complete(http, None)["tokens"]
    assert _complete(http, OFF)["tokens"] == base
    on = _complete(http, ON)["tokens"]
    assert on != base  # the adapter changes the model
    assert _complete(http, ON)["tokens"] == on
    half = _complete(http, HALF)["tokens"]
    assert half not in (base, on)  # the scale counts, not just whether the adapter is on


def test_a_cached_prefix_counts_only_under_its_scales(http: httpx.Client) -> None:
    prompt = "Zebras graze on the wide plains while the lions rest in the shade of trees"
    off = _complete(http, OFF, prompt)
    again = _complete(http, OFF, prompt)
    assert again["tokens_cached"] > 10 and again["tokens"] == off["tokens"]
    on = _complete(http, ON, prompt)
    # the KV computed without the adapter is no prefix of it (at most the BOS of another
    # prompt cached under its own scales)
    assert on["tokens_cached"] <= 1
    assert _complete(http, OFF, prompt)["tokens"] == off["tokens"]


def test_mixed_scales_in_flight_at_once_each_get_their_own(http: httpx.Client) -> None:
    alone = {name: _complete(http, lora)["tokens"] for name, lora in (("off", OFF), ("on", ON))}
    jobs = [("off", OFF), ("on", ON)] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: _complete(http, job[1])["tokens"], jobs))
    assert outs == [alone[name] for name, _ in jobs]


def test_post_sets_the_server_scales(http: httpx.Client) -> None:
    on = _complete(http, ON)["tokens"]
    base = _complete(http, OFF)["tokens"]
    try:
        r = http.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}])
        assert r.status_code == 200, r.text
        assert http.get("/lora-adapters").json()[0]["scale"] == 1.0
        assert _complete(http, None)["tokens"] == on
        assert _complete(http, OFF)["tokens"] == base  # a request's own scales still win
        # adapters left out of the list are turned off
        assert http.post("/lora-adapters", json=[]).status_code == 200
        assert _complete(http, None)["tokens"] == base
    finally:
        http.post("/lora-adapters", json=OFF)


def test_openai_sdk_passes_lora(server: ServerProcess, http: httpx.Client) -> None:
    client = server.openai()
    kwargs: dict[str, Any] = {"model": "x", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    on = client.completions.create(**kwargs, extra_body={"lora": ON}).choices[0].text
    off = client.completions.create(**kwargs, extra_body={"lora": OFF}).choices[0].text
    assert on != off
    assert client.completions.create(**kwargs).choices[0].text == off


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/completion", {"prompt": "hi", "lora": [{"id": 3, "scale": 1.0}]}),
        ("/completion", {"prompt": "hi", "lora": [{"id": 0, "scale": "big"}]}),
        ("/completion", {"prompt": "hi", "lora": [{"id": -1, "scale": 1.0}]}),
        ("/completion", {"prompt": "hi", "lora": {"id": 0}}),
        ("/v1/completions", {"prompt": "hi", "lora": [{"id": 0}]}),
        ("/lora-adapters", [{"id": 1, "scale": 1.0}]),
        ("/lora-adapters", {"id": 0, "scale": 1.0}),
        ("/lora-adapters", [{"id": 0, "scale": 1e30}]),
    ],
)
def test_bad_lora_is_a_400(http: httpx.Client, path: str, body: Any) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/lora-adapters").json()[0]["scale"] == 0.0
    assert _complete(http, None)["tokens"]  # still serving


def test_a_server_without_adapters_says_so(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as client:
        assert client.get("/lora-adapters").status_code == 501
        r = client.post("/completion", json={"prompt": "hi", "n_predict": 1, "lora": ON})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora"
