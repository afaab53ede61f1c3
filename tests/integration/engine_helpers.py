"""Small helpers for driving the engine in tests."""

from __future__ import annotations

import asyncio

from llamabox.engine import Engine
from llamabox.types import GenerateRequest, GenerationOutput, SamplingParams


def greedy(prompt: str | list[int], max_tokens: int = 16, **kw: object) -> GenerateRequest:
    sampling = SamplingParams(temperature=0.0, **kw)  # type: ignore[arg-type]
    return GenerateRequest(prompt=prompt, max_tokens=max_tokens, sampling=sampling)


async def collect(
    engine: Engine, request: GenerateRequest
) -> tuple[list[GenerationOutput], GenerationOutput]:
    """All outputs of a request, and the last one (which carries finish_reason and usage)."""
    outs = [o async for o in await engine.generate(request)]
    return outs, outs[-1]


async def text_of(engine: Engine, request: GenerateRequest) -> str:
    outs, _ = await collect(engine, request)
    return "".join(o.text for o in outs)


async def tokens_until_idle(engine: Engine, before: int) -> int:
    """Waits until no slot is busy; returns the tokens generated since ``before`` (a total).

    A cancelled 400-token request stops after a step or two: a small count proves the
    cancellation, where merely seeing the slot idle would not (the request may have run out).
    """
    for _ in range(500):
        if engine.stats().n_busy == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().n_busy == 0
    return engine.stats().n_tokens_predicted_total - before
