"""The engine on the real model, Gemma 3 270M (base, Q4_K_M; sliding-window attention)."""

from __future__ import annotations

import asyncio

import pytest

from llamabox.engine import Engine
from llamabox.types import GenerateRequest, SamplingParams
from tests.integration.engine_helpers import collect, greedy, text_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


async def test_capital_of_france(gemma_engine: Engine) -> None:
    # The exact greedy tokens depend on the CPU's kernels (" The capital of France is Paris."
    # on one machine, " Paris\nQ: ..." on another, llama.cpp's own tools agreeing on each):
    # what holds everywhere is that the answer names Paris.
    text = await text_of(gemma_engine, greedy("Q: What is the capital of France?\nA:", 12))
    assert "Paris" in text


async def test_eiffel_tower(gemma_engine: Engine) -> None:
    text = await text_of(gemma_engine, greedy("The Eiffel Tower is located in the city of", 3))
    assert text.startswith(" Paris")


async def test_stop_string_on_real_text(gemma_engine: Engine) -> None:
    """A stop string cuts the text where it first appears, whatever this machine's text is."""
    prompt = "Q: What is the capital of France?\nA:"
    full = await text_of(gemma_engine, greedy(prompt, 40, ignore_eos=True))
    words = [w for w in full.split() if len(w) >= 4]
    assert words, full
    stop = words[min(2, len(words) - 1)]
    req = GenerateRequest(
        prompt=prompt,
        max_tokens=40,
        stop=[stop],
        sampling=SamplingParams(temperature=0, ignore_eos=True),
    )
    outs, last = await collect(gemma_engine, req)
    assert "".join(o.text for o in outs) == full[: full.index(stop)]
    assert last.finish_reason == "stop" and last.stop_word == stop


async def test_batched_greedy_is_reproducible(gemma_engine: Engine) -> None:
    """Alone vs batched is exact on the tiny f16 model (test_engine.py), not on this one.

    The exact condition: most of this model's weights are Q5_0/Q8_0 (its 640-wide rows do not
    fit K-quant blocks). On CPU, ggml sends a matmul with one token row to its vec_dot kernels
    and one with two or more rows to llamafile's tinyBLAS (`llamafile_sgemm` declines n < 2),
    whose tiling also depends on the row count; the rounding differs, and a near-tie between
    the top two logits can flip a greedy token. Which rows share a step depends on when each
    request arrives, so batched runs are not bit-reproducible either. What holds, and is
    tested: a request alone gives the same output every time, and batched output starts with
    the same words as the output alone.
    """
    prompts = [
        "The Eiffel Tower is located in the city of",
        "Q: What is the capital of France?\nA:",
        "The largest planet in the solar system is",
        "Water boils at a temperature of",
        "The first president of the United States was",
        "Photosynthesis is the process by which",
        "The chemical symbol for gold is",
        "Mount Everest is the highest",
    ]

    async def batched() -> list[str]:
        return list(
            await asyncio.gather(
                *(text_of(gemma_engine, greedy(p, 16, ignore_eos=True)) for p in prompts)
            )
        )

    alone = [await text_of(gemma_engine, greedy(p, 16, ignore_eos=True)) for p in prompts]
    alone_again = [await text_of(gemma_engine, greedy(p, 16, ignore_eos=True)) for p in prompts]
    first = await batched()
    assert alone == alone_again
    assert [t.split()[:2] for t in first] == [t.split()[:2] for t in alone]


async def test_prefix_reuse_on_sliding_window_model(gemma_engine: Engine) -> None:
    # 600+ shared tokens: longer than Gemma's 512-token window, so reuse must keep every
    # position the window still needs (or fall back to a full prefill), and stay exact.
    system = " ".join(f"Rule {i}: be accurate and brief." for i in range(80))
    n_sys = len(await gemma_engine.tokenize(system))
    assert n_sys > 600
    q1, q2 = system + "\nQ: Name a fruit.\nA:", system + "\nQ: Name a colour.\nA:"
    _, cold = await collect(gemma_engine, greedy(q1, 24, ignore_eos=True))
    warm_text = await text_of(gemma_engine, greedy(q2, 24, ignore_eos=True))
    _, warm = await collect(gemma_engine, greedy(q2, 24, ignore_eos=True))
    assert cold.usage is not None and warm.usage is not None
    assert warm.usage.cached_tokens >= n_sys
    fresh_req = GenerateRequest(
        prompt=q2,
        max_tokens=24,
        cache_prompt=False,
        sampling=SamplingParams(temperature=0, ignore_eos=True),
    )
    fresh = await text_of(gemma_engine, fresh_req)
    assert warm_text == fresh


async def test_chat_template_fallback_is_gemmas(gemma_engine: Engine) -> None:
    prompt = await gemma_engine.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert prompt == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    tokens = await gemma_engine.tokenize(prompt)
    assert tokens[0] == 2 and tokens[1] != 2  # one BOS, not two
