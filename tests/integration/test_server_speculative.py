"""``llamabox serve`` with speculative decoding, through the official OpenAI SDK: the
per-request ``speculative`` object, draft counts in ``timings``, ``/slots`` and ``/metrics``,
and clear 400s for bad settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fixtures import make_tiny_llama
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = make_tiny_llama(tmp_path_factory.mktemp("spec") / "tiny.gguf")
    flags = ["-np", "2", "-c", "1024", "--metrics", "--model-draft", str(model),
             "--draft-p-min", "0", "--draft", "8", "--no-spec-adaptive"]  # fmt: skip
    with start_server(model, *flags) as server:
        yield server


def test_completion_reports_drafts(spec_server: ServerProcess) -> None:
    client = spec_server.openai()
    plain = client.completions.create(
        model="x", prompt="Hello world", max_tokens=24, temperature=0,
        extra_body={"speculative": {"type": "none"}},
    )  # fmt: skip
    spec = client.completions.create(model="x", prompt="Hello world", max_tokens=24, temperature=0)
    assert spec.choices[0].text == plain.choices[0].text
    with spec_server.http() as http:
        body = {"prompt": "Hello world", "n_predict": 24, "temperature": 0,
                "speculative": {"n_max": 4, "p_min": 0.0}}  # fmt: skip
        r = http.post("/completion", json=body)
        assert r.status_code == 200, r.text
        timings = r.json()["timings"]
        assert 0 < timings["draft_n"] <= 4 * 24 and timings["draft_n_accepted"] > 0
        metrics = http.get("/metrics").text
        drafted = [
            line for line in metrics.splitlines() if line.startswith("llamacpp:n_drafted_total")
        ]
        assert drafted and int(drafted[0].split()[1]) > 0
        assert "llamacpp:n_drafted_accepted_total" in metrics
        slots = http.get("/slots").json()
        assert all(s["speculative"] for s in slots)
        props = http.get("/props").json()
        assert props["default_generation_settings"]["speculative"]["n_max"] == 8


def test_chat_stream_with_drafts(spec_server: ServerProcess) -> None:
    client = spec_server.openai()
    kw = {"model": "x", "messages": [{"role": "user", "content": "Count: one two three"}],
          "max_tokens": 20, "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**kw, extra_body={"speculative": {"n_max": 0}})  # type: ignore[call-overload]
    chunks = client.chat.completions.create(**kw, stream=True)  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize(
    ("speculative", "words"),
    [
        ({"type": "magic"}, "speculative"),
        ({"n_max": -1}, "n_max"),
        ({"p_min": 2}, "p_min"),
        ({"n_maxx": 3}, "n_maxx"),
        ({"type": "ngram-cache", "n_max": "four"}, "n_max"),
    ],
)
def test_bad_speculative_fields_are_400(
    spec_server: ServerProcess, speculative: dict[str, object], words: str
) -> None:
    client = spec_server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="Hi", max_tokens=4,
                                  extra_body={"speculative": speculative})  # fmt: skip
    assert words in str(e.value)
    # the server is still fine
    ok = client.completions.create(model="x", prompt="Hi", max_tokens=4)
    assert ok.choices[0].finish_reason == "length"


def test_mismatched_draft_model_fails_at_start(tmp_path: Path) -> None:
    from tests.fixtures import VOCAB_GPT2

    model = make_tiny_llama(tmp_path / "a.gguf")
    draft = make_tiny_llama(tmp_path / "b.gguf", vocab_gguf=VOCAB_GPT2)
    with start_server(model, "-md", str(draft), wait=False) as server:
        assert server.proc.wait(timeout=60) != 0
        log = server.log()
    assert "cannot draft for" in log and str(draft) in log
