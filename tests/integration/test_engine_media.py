"""Media inputs in the engine (--mmproj): images as runs of placeholder tokens in the slot
scheduler, on the tiny model with a tiny LLaVA-style projector and on Gemma 3 270M with a tiny
``gemma3`` projector (non-causal image attention) of its hidden size.

Random weights say nothing about what an image shows; what is tested is that the image reaches
the model (the next-token distribution moves with the image), that a repeated image is neither
encoded again nor prefilled again, that media and text requests share steps, and that errors
are clear and leave the engine serving.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from llamabox.engine import Engine
from llamabox.types import (
    ContextLengthError,
    EngineConfig,
    GenerateRequest,
    InvalidRequestError,
    MediaInput,
    SamplingParams,
    SpeculativeConfig,
)
from tests.conftest import _started, _stopped
from tests.fixtures import make_tiny_llama
from tests.fixtures.tiny_mmproj import (
    make_test_png,
    make_test_wav,
    make_tiny_audio_mmproj,
    make_tiny_gemma3_mmproj,
    make_tiny_mmproj,
)
from tests.integration.engine_helpers import collect

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

IMAGE_A = make_test_png(None, 40, 30, seed=1)
IMAGE_B = make_test_png(None, 40, 30, seed=2)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def media_engine(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    """The tiny model with a tiny mlp projector (16 image tokens), 4 slots, a small cache."""
    proj = make_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mlp.gguf")
    engine = await _started(
        EngineConfig(
            model=str(tiny_model_path),
            mmproj=str(proj),
            n_parallel=4,
            n_ctx=4 * 512,
            n_threads=2,
            max_projected_cache=3,
        )
    )
    yield engine
    await _stopped(engine)


def _request(engine: Engine, text: str, *images: bytes, **sampling: object) -> GenerateRequest:
    mark = engine.media_marker
    assert mark is not None
    media = [
        MediaInput(data=img, param=f"messages[0].content[{i}]") for i, img in enumerate(images)
    ]
    return GenerateRequest(
        prompt=text.replace("<image>", mark),
        media=media,
        max_tokens=1,
        sampling=SamplingParams(temperature=0.0, logprobs=True, n_probs=8, **sampling),  # type: ignore[arg-type]
    )


async def _first_logprobs(engine: Engine, request: GenerateRequest) -> dict[int, float]:
    outs, _ = await collect(engine, request)
    lps = [lp for o in outs for lp in o.logprobs or []]
    assert lps
    return {t.token: t.logprob for t in lps[0].top}


def _differ(a: dict[int, float], b: dict[int, float], tol: float = 1e-3) -> bool:
    if a.keys() != b.keys():
        return True
    return any(abs(a[k] - b[k]) > tol for k in a)


async def test_model_info_and_marker(media_engine: Engine) -> None:
    info = media_engine.model_info
    assert info.vision and not info.audio
    mark = media_engine.media_marker
    assert mark and mark.startswith("<__llamabox_media_")


async def test_image_moves_the_distribution(media_engine: Engine) -> None:
    none = await _first_logprobs(media_engine, _request(media_engine, "Look: . What is it?"))
    a = await _first_logprobs(
        media_engine, _request(media_engine, "Look: <image>. What is it?", IMAGE_A)
    )
    b = await _first_logprobs(
        media_engine, _request(media_engine, "Look: <image>. What is it?", IMAGE_B)
    )
    assert _differ(a, none)
    assert _differ(a, b)


async def test_repeated_image_hits_caches(media_engine: Engine) -> None:
    image = make_test_png(None, 40, 30, seed=11)
    before = media_engine.stats()
    req = _request(media_engine, "Describe <image> please", image)
    _, first = await collect(media_engine, req)
    mid = media_engine.stats()
    assert mid.n_media_inputs_total == before.n_media_inputs_total + 1
    assert mid.n_media_encoded_total == before.n_media_encoded_total + 1
    _, second = await collect(media_engine, req)
    after = media_engine.stats()
    assert after.n_media_cache_hits_total == mid.n_media_cache_hits_total + 1
    assert after.n_media_encoded_total == mid.n_media_encoded_total
    assert first.usage is not None and second.usage is not None
    # the image's tokens count in the prompt, and the second prefill reuses them
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 16
    assert second.usage.cached_tokens >= second.usage.prompt_tokens - 4
    assert after.n_media_cache_entries <= 3


async def test_prefix_reuse_stops_at_a_different_image(media_engine: Engine) -> None:
    """Same text, a different image at the same place: the cached prefix ends before it."""
    prompt = "A long enough shared prefix of words. <image> and then"
    img1, img2 = make_test_png(None, 40, 30, seed=21), make_test_png(None, 40, 30, seed=22)
    await collect(media_engine, _request(media_engine, prompt, img1))
    _, last = await collect(media_engine, _request(media_engine, prompt, img2))
    assert last.usage is not None
    assert 0 < last.usage.cached_tokens < last.usage.prompt_tokens - 16


async def test_several_images_in_one_prompt(media_engine: Engine) -> None:
    ab = await _first_logprobs(
        media_engine, _request(media_engine, "<image> vs <image>?", IMAGE_A, IMAGE_B)
    )
    ba = await _first_logprobs(
        media_engine, _request(media_engine, "<image> vs <image>?", IMAGE_B, IMAGE_A)
    )
    assert _differ(ab, ba)


async def test_concurrent_media_and_text(media_engine: Engine) -> None:
    reqs = [
        _request(media_engine, f"Q{i}: <image> then", make_test_png(None, 40, 30, seed=100 + i))
        for i in range(6)
    ]
    reqs += [
        GenerateRequest(
            prompt=f"plain text {i}", max_tokens=8, sampling=SamplingParams(temperature=0)
        )
        for i in range(4)
    ]
    results = await asyncio.gather(*(collect(media_engine, r) for r in reqs))
    assert all(last.finish_reason in ("length", "stop") for _, last in results)


async def test_errors_name_the_part_and_keep_serving(media_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as bad:
        await collect(
            media_engine, _request(media_engine, "x <image> y", b"\x89PNG\r\n\x1a\nnot really")
        )
    assert bad.value.param == "messages[0].content[0]"
    with pytest.raises(InvalidRequestError):  # one marker, two files
        await collect(media_engine, _request(media_engine, "x <image> y", IMAGE_A, IMAGE_B))
    with pytest.raises(InvalidRequestError):  # a prompt may not end in an image
        await collect(media_engine, _request(media_engine, "x <image>", IMAGE_A))
    outs, last = await collect(media_engine, _request(media_engine, "x <image> y", IMAGE_A))
    assert last.finish_reason == "length"


async def test_fifty_image_requests_back_to_back(media_engine: Engine) -> None:
    """gpustack#2090: a server that hung after a few image requests. Five distinct images in a
    cache of three, so entries are evicted and encoded again along the way."""
    images = [make_test_png(None, 40, 30, seed=200 + i) for i in range(5)]
    for i in range(50):
        _, last = await collect(
            media_engine, _request(media_engine, f"n{i} <image> ok", images[i % 5])
        )
        assert last.finish_reason == "length"
    stats = media_engine.stats()
    assert stats.n_busy == 0 and stats.n_queued == 0
    assert stats.n_media_cache_entries <= 3


async def test_no_projector_is_a_clear_error(tiny_engine: Engine) -> None:
    assert tiny_engine.media_marker is None
    req = GenerateRequest(prompt="x y", media=[MediaInput(data=IMAGE_A, param="images[0]")])
    with pytest.raises(InvalidRequestError) as e:
        await collect(tiny_engine, req)
    assert e.value.param == "images[0]"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gemma_media_engine(
    gemma_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    proj = make_tiny_gemma3_mmproj(tmp_path_factory.mktemp("mmproj") / "gemma3.gguf", n_merge=2)
    engine = await _started(
        EngineConfig(
            model=str(gemma_model_path), mmproj=str(proj), n_parallel=2, n_ctx=2048, n_threads=2
        )
    )
    yield engine
    await _stopped(engine)


@pytest.mark.slow
async def test_gemma3_takes_an_image(gemma_media_engine: Engine) -> None:
    """The real model through the whole path: a non-causal image run of 256 tokens (64/4
    patches, pooled by 2), its distribution moved by the image, and the repeat cached."""
    engine = gemma_media_engine
    prompt = "<start_of_turn>user\n<image>Describe the image.<end_of_turn>\n<start_of_turn>model\n"
    none = await _first_logprobs(engine, _request(engine, prompt.replace("<image>", "")))
    b = await _first_logprobs(engine, _request(engine, prompt, IMAGE_B))
    a = await _first_logprobs(engine, _request(engine, prompt, IMAGE_A))
    assert _differ(a, none) and _differ(a, b)
    outs, last = await collect(engine, _request(engine, prompt, IMAGE_A))  # right after A
    assert last.usage is not None
    assert last.usage.prompt_tokens > 64
    assert last.usage.cached_tokens >= last.usage.prompt_tokens - 4


async def test_image_in_ubatch_sized_pieces(
    media_engine: Engine, tiny_model_path: Path, tmp_path: Path
) -> None:
    """A causal image run longer than n_ubatch is decoded in pieces, within the step budget of
    the other slots; the model sees the same thing as when it is decoded whole."""
    proj = make_tiny_mmproj(tmp_path / "mlp.gguf")
    engine = await _started(
        EngineConfig(
            model=str(tiny_model_path),
            mmproj=str(proj),
            n_parallel=2,
            n_ctx=1024,
            n_batch=8,
            n_ubatch=8,
            n_threads=2,
        )
    )
    try:
        prompt = "Look: <image>. What is it?"
        pieces = await _first_logprobs(engine, _request(engine, prompt, IMAGE_A))
        whole = await _first_logprobs(media_engine, _request(media_engine, prompt, IMAGE_A))
        assert pieces.keys() == whole.keys()
        assert not _differ(pieces, whole, tol=1e-2)
        assert engine.stats().n_media_decodes_total >= 2
    finally:
        await _stopped(engine)


async def test_context_check_counts_image_tokens(media_engine: Engine) -> None:
    """A prompt whose text fits the slot's 512 positions but not with its 16 image tokens."""
    words = "one two three four five six seven eight nine ten " * 60
    n = len(await media_engine.tokenize(words))
    while n > 500:  # text that fits, with room for less than the image
        words = words.rsplit(" ", 2)[0] + " "
        n = len(await media_engine.tokenize(words))
    assert 490 < n <= 500
    _, alone = await collect(media_engine, _request(media_engine, words + " end"))  # text fits
    assert alone.finish_reason == "length"
    req = _request(media_engine, words + "<image> end", IMAGE_A)
    req.sampling.ignore_eos = True
    with pytest.raises(ContextLengthError):
        await collect(media_engine, req)


async def test_audio_through_a_whisper_projector(tiny_model_path: Path, tmp_path: Path) -> None:
    """A tiny Qwen2-Audio projector: a WAV becomes one 750-token chunk (30 s, padded), which
    moves the distribution with the audio and is cached like an image."""
    proj = make_tiny_audio_mmproj(tmp_path / "qwen2a.gguf")
    engine = await _started(
        EngineConfig(
            model=str(tiny_model_path), mmproj=str(proj), n_parallel=1, n_ctx=2048, n_threads=2
        )
    )
    try:
        assert engine.model_info.audio and not engine.model_info.vision
        wav1, wav2 = make_test_wav(1.0, seed=1), make_test_wav(1.0, seed=2)
        one = await _first_logprobs(engine, _request(engine, "Listen: <image> what?", wav1))
        two = await _first_logprobs(engine, _request(engine, "Listen: <image> what?", wav2))
        assert _differ(one, two)
        _, last = await collect(engine, _request(engine, "Listen: <image> what?", wav2))
        assert last.usage is not None and last.usage.prompt_tokens > 750
        assert last.usage.cached_tokens >= last.usage.prompt_tokens - 4
        assert engine.stats().n_media_cache_hits_total >= 1
    finally:
        await _stopped(engine)


async def test_speculation_is_off_for_media_requests(
    media_engine: Engine, tiny_model_path: Path, tmp_path: Path
) -> None:
    """A server with n-gram drafting serves an image request with plain decoding: nothing is
    drafted for it, and its greedy tokens are those of a server without speculation."""
    proj = make_tiny_mmproj(tmp_path / "mlp.gguf")  # the same seed: the same projector
    engine = await _started(
        EngineConfig(
            model=str(tiny_model_path),
            mmproj=str(proj),
            n_parallel=2,
            n_ctx=1024,
            n_threads=2,
            speculative=SpeculativeConfig(types=["ngram-simple"]),
        )
    )
    try:
        prompt = "a b c a b c a b c <image> a b c a b c"

        def req(e: Engine) -> GenerateRequest:
            r = _request(e, prompt, IMAGE_A, ignore_eos=True)
            r.max_tokens = 16
            return r

        outs, last = await collect(engine, req(engine))
        plain, _ = await collect(media_engine, req(media_engine))
        assert last.usage is not None and last.usage.drafted_tokens == 0
        assert [t for o in outs for t in o.token_ids] == [t for o in plain for t in o.token_ids]
    finally:
        await _stopped(engine)


async def test_visual_max_image_size_scales_down_first(
    media_engine: Engine, tiny_model_path: Path, tmp_path: Path
) -> None:
    """--visual-max-image-size 50 turns a 200x100 image into 50x25 (box filter: the mean of
    each 4x4 block) before the projector: the model sees what it sees given that 50x25 image."""
    big = make_test_png(None, 200, 100, seed=7)
    pixels = np.asarray(Image.open(io.BytesIO(big)).convert("RGB"), dtype=np.uint32)
    blocks = pixels.reshape(25, 4, 50, 4, 3).sum(axis=(1, 3))
    small = np.asarray((blocks + 8) // 16, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small, "RGB").save(buf, format="PNG")

    proj = make_tiny_mmproj(tmp_path / "mlp.gguf")
    engine = await _started(
        EngineConfig(
            model=str(tiny_model_path),
            mmproj=str(proj),
            n_parallel=1,
            n_ctx=512,
            n_threads=2,
            visual_max_image_size=50,
        )
    )
    try:
        prompt = "Look: <image>. What is it?"
        scaled = await _first_logprobs(engine, _request(engine, prompt, big))
        given = await _first_logprobs(media_engine, _request(media_engine, prompt, buf.getvalue()))
        full = await _first_logprobs(media_engine, _request(media_engine, prompt, big))
        assert not _differ(scaled, given, tol=1e-4)
        assert _differ(scaled, full, tol=1e-4)
    finally:
        await _stopped(engine)


# ---- M-RoPE (Qwen2-VL): an image's rows take fewer positions than their count ----
# The positions themselves are checked against libmtmd's own decode in test_mmproj_fixture.py;
# here, what the slot's bookkeeping (slot::spans) must keep right around them.


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mrope_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    """A tiny qwen2vl text model with a tiny qwen2vl_merger projector: a 64 x 48 image is 48
    tokens at 8 positions. 3 slots; 16-row pieces, so that images are decoded in several steps."""
    d = tmp_path_factory.mktemp("mrope")
    model = make_tiny_llama(d / "tiny-qwen2vl.gguf", arch="qwen2vl")
    proj = make_tiny_mmproj(d / "qwen2vl.gguf", projector="qwen2vl")
    engine = await _started(
        EngineConfig(
            model=str(model),
            mmproj=str(proj),
            n_parallel=3,
            n_ctx=3 * 1024,
            n_batch=16,
            n_ubatch=16,
            n_threads=2,
        )
    )
    yield engine
    await _stopped(engine)


QWEN_A = make_test_png(None, 64, 48, seed=1)
QWEN_B = make_test_png(None, 64, 48, seed=2)


async def test_mrope_images_and_text_share_steps(mrope_engine: Engine) -> None:
    """Image requests (one or two images, long continuations past the image's positions) and
    text requests at once: all finish, and each image request's first token is what it is alone."""
    alone = await _first_logprobs(mrope_engine, _request(mrope_engine, "Look <image> then", QWEN_A))
    uncached = _request(mrope_engine, "Look <image> then", QWEN_A)
    uncached.cache_prompt = False
    reqs = [
        uncached,
        _request(mrope_engine, "<image> or <image>?", QWEN_A, QWEN_B),
        _request(mrope_engine, "Look <image> then", QWEN_B),
    ]
    reqs += [_request(mrope_engine, f"plain text {i}") for i in range(3)]
    for r in reqs:
        r.max_tokens = 40
    results = await asyncio.gather(*(collect(mrope_engine, r) for r in reqs))
    assert all(last.finish_reason in ("length", "stop") for _, last in results)
    outs, _ = results[0]
    first = {t.token: t.logprob for t in outs[0].logprobs[0].top}  # type: ignore[index]
    assert not _differ(first, alone, tol=2e-3)
    two = results[1][1].usage
    assert two is not None and two.prompt_tokens > 2 * 48


async def test_mrope_prefix_reuse_keeps_the_image_or_drops_it_whole(mrope_engine: Engine) -> None:
    """A cached image is reused (the text after it at its shifted positions), and a prompt that
    diverges after it starts from the image's end, not before; a different image at the same
    place is not reused."""
    prompt = "A shared prefix of words. <image> and then"
    cold = await _first_logprobs(mrope_engine, _request(mrope_engine, prompt + " more", QWEN_B))
    _, first = await collect(mrope_engine, _request(mrope_engine, prompt, QWEN_B))
    warm_req = _request(mrope_engine, prompt + " more", QWEN_B)
    outs, last = await collect(mrope_engine, warm_req)
    assert last.usage is not None and first.usage is not None
    assert last.usage.cached_tokens >= first.usage.prompt_tokens - 1
    warm = {t.token: t.logprob for t in outs[0].logprobs[0].top}  # type: ignore[index]
    assert not _differ(warm, cold, tol=2e-3)
    _, other = await collect(mrope_engine, _request(mrope_engine, prompt, QWEN_A))
    assert other.usage is not None
    assert 0 < other.usage.cached_tokens < other.usage.prompt_tokens - 48


async def test_mrope_slot_cannot_be_saved_with_an_image(
    mrope_engine: Engine, tmp_path: Path
) -> None:
    """A slot file records tokens and KV, not where positions skip: refused, clearly; the slot
    saves again once its cache holds text only."""
    await collect(mrope_engine, _request(mrope_engine, "Only <image> here", QWEN_A))
    refused = 0
    for s in range(3):
        try:
            await mrope_engine.slot_action(s, "save", str(tmp_path / f"s{s}.bin"))
        except InvalidRequestError as e:
            assert "M-RoPE" in str(e)
            refused += 1
    assert refused >= 1
    for s in range(3):
        await mrope_engine.slot_action(s, "erase")
        saved = await mrope_engine.slot_action(s, "save", str(tmp_path / f"e{s}.bin"))
        assert saved["n_saved"] == 0


async def test_mrope_many_image_requests_back_to_back(mrope_engine: Engine) -> None:
    images = [make_test_png(None, 64 - 8 * (i % 3), 48, seed=300 + i) for i in range(4)]
    for i in range(20):
        _, last = await collect(
            mrope_engine, _request(mrope_engine, f"n{i} <image> ok", images[i % 4])
        )
        assert last.finish_reason == "length"
    stats = mrope_engine.stats()
    assert stats.n_busy == 0 and stats.n_queued == 0


async def test_image_token_bounds_on_a_dynamic_resolution_projector(tmp_path: Path) -> None:
    """--image-max-tokens / --image-min-tokens resize an image for a dynamic-resolution
    projector (Qwen2-VL's): a 64 x 48 image is 48 tokens by default, at most 12 and at least
    100 under the bounds, its aspect ratio kept."""
    model = make_tiny_llama(tmp_path / "tiny-qwen2vl.gguf", arch="qwen2vl")
    proj = make_tiny_mmproj(tmp_path / "qwen2vl.gguf", projector="qwen2vl")
    counts = {}
    for name, bounds in (
        ("default", {}),
        ("max", {"image_max_tokens": 12}),
        ("min", {"image_min_tokens": 100}),
    ):
        engine = await _started(
            EngineConfig(
                model=str(model), mmproj=str(proj), n_parallel=1, n_ctx=2048, n_threads=2, **bounds
            )  # type: ignore[arg-type]
        )
        try:
            with_image = (await collect(engine, _request(engine, "Look <image> then", QWEN_A)))[1]
            text_only = (await collect(engine, _request(engine, "Look  then")))[1]
            assert with_image.usage is not None and text_only.usage is not None
            counts[name] = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
        finally:
            await _stopped(engine)
    framing = counts["default"] - 48  # <|vision_start|> and <|vision_end|> as text tokens
    assert framing > 0
    assert counts["max"] - framing <= 12
    assert counts["min"] - framing >= 100
