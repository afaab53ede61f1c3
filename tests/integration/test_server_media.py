"""Images over HTTP (--mmproj): OpenAI content parts through the official SDK, Ollama's
``images``, llama.cpp's ``multimodal_data``, Anthropic image blocks and Responses'
``input_image``; remote URLs; the 400s of bad media; the capability advertisements.

A real ``llamabox serve`` on the tiny model with a tiny LLaVA-style projector. What an image
"shows" means nothing with random weights: the tests compare next-token distributions.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.tiny_mmproj import (
    make_test_image,
    make_test_png,
    make_test_wav,
    make_tiny_audio_mmproj,
    make_tiny_mmproj,
)
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

IMAGE_A = make_test_png(None, 40, 30, seed=1)
IMAGE_B = make_test_png(None, 40, 30, seed=2)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mlp.gguf")


@pytest.fixture(scope="module")
def media_server(tiny_model_path: Path, projector: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "4", "-c", "4096", "-a", "tiny-vision", "--metrics", "--mmproj", str(projector)]
    flags += ["--max-projected-cache", "4", "--media-max-size", "300K"]
    flags += ["--media-max-pixels", "1000000"]
    with start_server(tiny_model_path, *flags) as server:
        yield server


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    m = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _top(choice_logprobs: object) -> dict[str, float]:
    content = getattr(choice_logprobs, "content", None)
    assert content
    return {t.token: t.logprob for t in content[0].top_logprobs}


def _chat_top(
    client: openai.OpenAI, *images: bytes, text: str = "What is this?"
) -> dict[str, float]:
    parts: list[dict[str, object]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]
    r = client.chat.completions.create(
        model="tiny-vision",
        messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
        max_tokens=1,
        temperature=0,
        logprobs=True,
        top_logprobs=8,
    )
    return _top(r.choices[0].logprobs)


def _differ(a: dict[str, float], b: dict[str, float], tol: float = 1e-3) -> bool:
    return a.keys() != b.keys() or any(abs(a[k] - b[k]) > tol for k in a)


def _idle(server: ServerProcess) -> None:
    slots = httpx.get(f"{server.base_url}/slots", timeout=10).json()
    assert all(not s["is_processing"] for s in slots), slots


def test_sdk_sends_an_image_that_moves_the_answer(media_server: ServerProcess) -> None:
    client = media_server.openai()
    none = _chat_top(client)
    a = _chat_top(client, IMAGE_A)
    b = _chat_top(client, IMAGE_B)
    assert _differ(a, none) and _differ(a, b)
    assert _chat_top(client, IMAGE_A, IMAGE_B) != _chat_top(client, IMAGE_B, IMAGE_A)
    _idle(media_server)


def test_repeated_image_hits_the_projected_cache(media_server: ServerProcess) -> None:
    client = media_server.openai()
    image = make_test_png(None, 40, 30, seed=33)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "Describe it."},
    ]
    ask = dict(model="tiny-vision", messages=[{"role": "user", "content": content}], max_tokens=2)
    first = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    hits, encoded = (
        _metric(media_server, "media_cache_hits_total"),
        _metric(media_server, "media_encoded_total"),
    )
    second = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert _metric(media_server, "media_cache_hits_total") == hits + 1
    assert _metric(media_server, "media_encoded_total") == encoded
    assert first.usage and second.usage
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 16  # image tokens count
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= second.usage.prompt_tokens - 4


def test_streaming_with_an_image(media_server: ServerProcess) -> None:
    stream = media_server.openai().chat.completions.create(
        model="tiny-vision",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}},
                ],
            }
        ],
        max_tokens=6,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_image_and_text_requests(media_server: ServerProcess) -> None:
    client = media_server.openai()

    def image(i: int) -> str:
        return _chat_top(client, make_test_png(None, 40, 30, seed=300 + i)) and "ok"

    def text(i: int) -> str:
        r = client.chat.completions.create(
            model="tiny-vision", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=8
        )
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(image, i) for i in range(6)] + [
            pool.submit(text, i) for i in range(6)
        ]
        results = [f.result(timeout=60) for f in futures]
    assert results[:6] == ["ok"] * 6 and all(r in ("length", "stop") for r in results[6:])
    _idle(media_server)


def _bad(server: ServerProcess, content: list[dict[str, object]]) -> dict[str, object]:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": content}]
        },
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error  # type: ignore[no-any-return]


def _bmp_header(width: int, height: int) -> bytes:
    """A BMP whose header claims width x height (the pixels are not there)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(info), 0, 0, 54) + info


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("data:image/png;base64,%%%not-base64%%%", "base64"),
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), ""),  # a PNG signature, no image
        (data_url(b"just some text, not an image"), ""),
        (data_url(b"\x89PNG" + b"\0" * 400_000), "--media-max-size"),
        (data_url(_bmp_header(2000, 2000), "image/bmp"), "--media-max-pixels"),
        ("ftp://example.com/cat.png", "data:"),
        ("data:image/png,rawbytes", "base64"),
    ],
)
def test_bad_images_are_400s_naming_the_part(
    media_server: ServerProcess, url: str, says: str
) -> None:
    error = _bad(
        media_server,
        [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}],
    )
    assert error["param"] == "messages[1].content[1]"
    assert "messages[1].content[1]" in str(error["message"])
    assert says in str(error["message"])
    # and the server goes on serving
    assert _chat_top(media_server.openai(), IMAGE_A)


def test_remote_urls_are_refused_without_the_flag(media_server: ServerProcess) -> None:
    error = _bad(
        media_server,
        [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
    )
    assert "--allow-remote-media" in str(error["message"])


def test_audio_to_a_vision_projector_is_a_400(media_server: ServerProcess) -> None:
    wav = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + b"\0" * 24
    r = httpx.post(
        f"{media_server.base_url}/v1/chat/completions",
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
                        {"type": "text", "text": "x"},
                    ],
                }
            ]
        },
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].content[0]"


def test_no_projector_is_a_400(tiny_server: ServerProcess) -> None:
    r = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions",
        headers=tiny_server.headers,
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}},
                    ],
                }
            ]
        },
        timeout=30,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[0].content[1]" and "--mmproj" in error["message"]
    props = httpx.get(f"{tiny_server.base_url}/props", headers=tiny_server.headers).json()
    assert props["modalities"] == {"vision": False, "audio": False}


def test_capabilities_are_advertised(media_server: ServerProcess) -> None:
    props = httpx.get(f"{media_server.base_url}/props", timeout=10).json()
    assert props["modalities"] == {"vision": True, "audio": False}
    models = httpx.get(f"{media_server.base_url}/v1/models", timeout=10).json()["data"]
    assert "vision" in models[0]["capabilities"]
    show = httpx.post(f"{media_server.base_url}/api/show", json={"model": "tiny-vision"}).json()
    assert "vision" in show["capabilities"]


def test_ollama_images(media_server: ServerProcess) -> None:
    url = media_server.base_url

    def chat(images: list[str]) -> dict[str, float]:
        body = {
            "model": "tiny-vision",
            "messages": [{"role": "user", "content": "What is it?", "images": images}],
            "stream": False,
            "options": {"temperature": 0, "num_predict": 4},
        }
        r = httpx.post(f"{url}/api/chat", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    assert chat([b64(IMAGE_A)])["done"]
    gen = httpx.post(
        f"{url}/api/generate",
        json={
            "model": "tiny-vision",
            "prompt": "Describe",
            "images": [b64(IMAGE_B)],
            "stream": False,
            "options": {"num_predict": 3},
        },
        timeout=30,
    )
    assert gen.status_code == 200 and gen.json()["done"], gen.text
    bad = httpx.post(
        f"{url}/api/chat",
        json={
            "model": "tiny-vision",
            "messages": [{"role": "user", "content": "x", "images": ["@@"]}],
        },
        timeout=30,
    )
    assert bad.status_code == 400 and "messages[0].images[0]" in bad.text


def test_multimodal_data_on_completion_endpoints(media_server: ServerProcess) -> None:
    url = media_server.base_url

    def native(body: dict[str, object]) -> httpx.Response:
        return httpx.post(f"{url}/completion", json=body, timeout=30)

    base = {"n_predict": 1, "temperature": 0, "n_probs": 5}
    a = native({"prompt": "Look <__media__> now", "multimodal_data": [b64(IMAGE_A)], **base})
    b = native(
        {
            "prompt": {"prompt_string": "Look <__media__> now", "multimodal_data": [b64(IMAGE_B)]},
            **base,
        }
    )
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["completion_probabilities"] != b.json()["completion_probabilities"]
    assert a.json()["tokens_evaluated"] > 16
    mark = httpx.get(f"{url}/props", timeout=10).json()["media_marker"]  # llama-server's way
    c = native({"prompt": f"Look {mark} now", "multimodal_data": [b64(IMAGE_A)], **base})
    assert c.status_code == 200, c.text
    assert c.json()["completion_probabilities"] == a.json()["completion_probabilities"]
    mismatch = native({"prompt": "<__media__> <__media__>", "multimodal_data": [b64(IMAGE_A)]})
    assert mismatch.status_code == 400
    oai = media_server.openai().completions.create(
        model="tiny-vision",
        prompt="Look <__media__> now",
        max_tokens=2,
        extra_body={"multimodal_data": [b64(IMAGE_A)]},
    )
    assert oai.usage and oai.usage.prompt_tokens > 16


def test_anthropic_and_responses_images(media_server: ServerProcess) -> None:
    url = media_server.base_url
    msg = httpx.post(
        f"{url}/v1/messages",
        json={
            "model": "tiny-vision",
            "max_tokens": 3,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": b64(IMAGE_A),
                            },
                        },
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ],
        },
        timeout=30,
    )
    assert msg.status_code == 200, msg.text
    usage = msg.json()["usage"]  # Anthropic's input_tokens leave out the cached ones
    assert usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) > 16
    resp = media_server.openai().responses.create(
        model="tiny-vision",
        max_output_tokens=3,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is it?"},
                    {"type": "input_image", "image_url": data_url(IMAGE_B), "detail": "auto"},
                ],
            }
        ],
    )
    assert resp.usage and resp.usage.input_tokens > 16


def test_fifty_image_requests_back_to_back(media_server: ServerProcess) -> None:
    """gpustack#2090: LLaMA Box hung after a few image requests. Six images through a cache of
    four, so that entries are evicted and encoded again."""
    client = media_server.openai()
    images = [make_test_png(None, 40, 30, seed=400 + i) for i in range(6)]
    for i in range(50):
        r = client.chat.completions.create(
            model="tiny-vision",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(images[i % 6])}},
                        {"type": "text", "text": f"#{i}"},
                    ],
                }
            ],
            max_tokens=2,
        )
        assert r.choices[0].finish_reason in ("length", "stop")
    _idle(media_server)
    assert _metric(media_server, "media_cache_entries") <= 4
    assert _metric(media_server, "requests_processing") == 0


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def file_server() -> Iterator[str]:
    _Files.files = {"/a.png": IMAGE_A, "/big.png": b"\x89PNG" + b"\0" * 400_000}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_media_fetched_when_allowed(
    tiny_model_path: Path, projector: Path, file_server: str, media_server: ServerProcess
) -> None:
    flags = [
        "-np",
        "2",
        "-c",
        "1024",
        "-a",
        "v",
        "--mmproj",
        str(projector),
        "--allow-remote-media",
    ]
    with start_server(tiny_model_path, *flags) as public_only:
        content = [{"type": "image_url", "image_url": {"url": f"{file_server}/a.png"}}]
        error = _bad(public_only, content)
        assert "--allow-remote-media-private" in str(error["message"])
    flags += ["--allow-remote-media-private", "--media-max-size", "300K"]
    with start_server(tiny_model_path, *flags) as server:
        client = server.openai()

        def ask(url: str) -> dict[str, float]:
            r = client.chat.completions.create(
                model="v",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=8,
            )
            return _top(r.choices[0].logprobs)

        remote = ask(f"{file_server}/a.png")
        inline = ask(data_url(IMAGE_A))
        assert not _differ(remote, inline, tol=1e-2)  # the same bytes, fetched
        for path, says in (("/missing.png", "404"), ("/big.png", "--media-max-size")):
            error = _bad(server, [{"type": "image_url", "image_url": {"url": file_server + path}}])
            assert says in str(error["message"]), error


def test_input_audio_through_the_sdk(tiny_model_path: Path, tmp_path: Path) -> None:
    proj = make_tiny_audio_mmproj(tmp_path / "qwen2a.gguf")
    with start_server(
        tiny_model_path, "-np", "1", "-c", "2048", "-a", "ears", "--mmproj", str(proj)
    ) as server:
        client = server.openai()

        def ask(wav: bytes) -> dict[str, float]:
            r = client.chat.completions.create(
                model="ears",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What do you hear?"},
                            {
                                "type": "input_audio",
                                "input_audio": {"data": b64(wav), "format": "wav"},
                            },
                        ],
                    }
                ],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=8,
            )
            assert r.usage is not None and r.usage.prompt_tokens > 750
            return _top(r.choices[0].logprobs)

        assert _differ(ask(make_test_wav(1.0, seed=1)), ask(make_test_wav(1.0, seed=2)))
        props = httpx.get(f"{server.base_url}/props", timeout=10).json()
        assert props["modalities"] == {"vision": False, "audio": True}
        models = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
        assert "audio" in models[0]["capabilities"] and "vision" not in models[0]["capabilities"]
        error = _bad(server, [{"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}}])
        assert "image" in str(error["message"]) and error["param"] == "messages[1].content[0]"


def test_n_choices_with_an_image(media_server: ServerProcess) -> None:
    r = media_server.openai().chat.completions.create(
        model="tiny-vision",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(IMAGE_B)}},
                    {"type": "text", "text": "Two takes"},
                ],
            }
        ],
        max_tokens=4,
        n=3,
        temperature=1.0,
        seed=5,
    )
    assert len(r.choices) == 3 and r.usage and r.usage.prompt_tokens > 16
    _idle(media_server)


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("BMP", "image/bmp"),
     ("WEBP", "image/webp")],
)  # fmt: skip
def test_every_image_format(media_server: ServerProcess, fmt: str, mime: str) -> None:
    image = make_test_image(None, 40, 30, seed=9, format=fmt)  # type: ignore[arg-type]
    r = media_server.openai().chat.completions.create(
        model="tiny-vision",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image, mime)}},
                    {"type": "text", "text": "Which format?"},
                ],
            }
        ],
        max_tokens=1,
    )
    assert r.usage and r.usage.prompt_tokens > 16


def test_disconnect_during_an_image_request_frees_the_slot(media_server: ServerProcess) -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}},
                    {"type": "text", "text": "Go on and on"},
                ],
            }
        ],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{media_server.base_url}/v1/chat/completions", json=body, timeout=30
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    for _ in range(100):
        slots = httpx.get(f"{media_server.base_url}/slots", timeout=10).json()
        if not any(s["is_processing"] for s in slots):
            break
        time.sleep(0.05)
    _idle(media_server)
    assert _chat_top(media_server.openai(), IMAGE_A)  # and the same image serves again


def test_qwen2vl_style_model_through_the_sdk(tmp_path: Path) -> None:
    """An M-RoPE model (a tiny qwen2vl text model with a qwen2vl_merger projector): the SDK's
    image moves the answer, a streamed answer runs on past the image's positions, the
    capability is advertised, and --image-max-tokens bounds the image."""
    from tests.fixtures import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny-qwen2vl.gguf", arch="qwen2vl")
    proj = make_tiny_mmproj(tmp_path / "qwen2vl.gguf", projector="qwen2vl")
    image_a, image_b = make_test_png(None, 64, 48, seed=1), make_test_png(None, 64, 48, seed=2)
    flags = ["-np", "2", "-c", "4096", "-a", "tiny-vl", "--mmproj", str(proj)]
    with start_server(model, *flags, "--image-max-tokens", "12") as server:
        client = server.openai()

        def ask(*images: bytes) -> tuple[dict[str, float], int]:
            parts: list[dict[str, object]] = [{"type": "text", "text": "What is this?"}]
            parts += [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
            r = client.chat.completions.create(
                model="tiny-vl",
                messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=8,
            )
            assert r.usage is not None
            return _top(r.choices[0].logprobs), r.usage.prompt_tokens

        (none, n_none), (a, n_a), (b, _) = ask(), ask(image_a), ask(image_b)
        assert _differ(a, none) and _differ(a, b)
        assert 0 < n_a - n_none <= 12 + 16  # at most 12 image tokens, and the framing text
        stream = client.chat.completions.create(
            model="tiny-vl",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(image_b)}},
                        {"type": "text", "text": "Tell me a long story about it."},
                    ],
                }
            ],
            max_tokens=64,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        props = httpx.get(f"{server.base_url}/props", timeout=10).json()
        assert props["modalities"] == {"vision": True, "audio": False}
        models = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
        assert "vision" in models[0]["capabilities"]
        _idle(server)


def test_anthropic_tool_result_with_a_screenshot(media_server: ServerProcess) -> None:
    """A tool that returns an image (a screenshot tool, say), through the official anthropic
    SDK: the image reaches the model inside the tool's result (its 16 tokens count in the
    prompt), and a bad one is a 400 naming its block."""
    import anthropic

    claude = anthropic.Anthropic(base_url=media_server.base_url, api_key="none", max_retries=0)

    def ask(image: bytes | str | None) -> anthropic.types.Message:
        data = image if isinstance(image, str) else b64(image or b"")
        shot = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": data},
        }
        return claude.messages.create(
            model="tiny-vision",
            max_tokens=1,
            tools=[
                {
                    "name": "screenshot",
                    "description": "the screen",
                    "input_schema": {"type": "object"},
                }
            ],
            messages=[
                {"role": "user", "content": "What is on my screen?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "text", "text": "the screen:"},
                                *([shot] if image is not None else []),
                            ],
                        }
                    ],
                },
            ],
        )

    def n_input(m: anthropic.types.Message) -> int:
        return m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)

    none, a, b = ask(None), ask(IMAGE_A), ask(IMAGE_B)
    assert n_input(a) == n_input(b) >= n_input(none) + 16
    assert b.usage.cache_read_input_tokens  # the text before the image is a cached prefix
    with pytest.raises(anthropic.BadRequestError) as bad:
        ask("not base64!")
    assert "messages[2].content[0].content[1]" in str(bad.value)
    _idle(media_server)
