"""-tps / X-Request-Tokens-Per-Second: each request's output delivered at a bounded rate.

LLaMA Box's limit, as its users know it: ``-tps N`` caps every request at N tokens a second, and
a request's ``X-Request-Tokens-Per-Second`` header may ask for less. The limit is on delivery,
not on decoding: the engine generates at its own speed (its slot is free sooner), and the
outputs wait here, each in the order and size the engine gave them, until their time has come.
The first output goes at once (time to first token is not paced); after it, a stream that has
delivered ``k`` tokens hands on the next output no earlier than ``k / rate`` seconds after the
first, so over any stretch the delivered rate is at most ``rate``.
"""

from __future__ import annotations

import asyncio
import math
import time

from llamabox.api.state import AppState, RequestStreamLike
from llamabox.types import GenerationOutput, InvalidRequestError

HEADER = "x-request-tokens-per-second"


def request_rate(state: AppState, headers: dict[str, str]) -> float | None:
    """The tokens a second this request's output may be delivered at; None: no limit."""
    limit = state.config.tokens_per_second
    if limit == 0:
        return None  # off: the header is ignored, as in LLaMA Box
    asked = headers.get(HEADER)
    rate: float | None = float(limit) if limit > 0 else None
    if asked is not None:
        try:
            value = float(asked)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise InvalidRequestError(
                f"X-Request-Tokens-Per-Second must be a number of tokens a second above 0, "
                f"not {asked!r}",
                param="X-Request-Tokens-Per-Second",
            )
        rate = value if rate is None else min(rate, value)
    return rate


class PacedStream:
    """``inner``'s outputs, delivered at most ``rate`` tokens a second (see the module). The
    engine's stream keeps each step's output apart from now on (it would merge what a reader
    has not taken yet), so outputs wait there, in the engine's order and sizes, while this
    reader sleeps until each one is due."""

    def __init__(self, inner: RequestStreamLike, rate: float) -> None:
        self._inner = inner
        self._rate = rate
        self._first: float | None = None
        self._delivered = 0
        inner.keep_outputs()

    def __aiter__(self) -> PacedStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        item = await self._inner.__anext__()
        now = time.monotonic()
        if self._first is None:
            self._first = now
        else:
            due = self._first + self._delivered / self._rate
            if due > now:
                await asyncio.sleep(due - now)
        self._delivered += len(item.token_ids)
        return item

    def cancel(self) -> None:
        self._inner.cancel()

    def keep_outputs(self) -> None:
        pass  # it always does
