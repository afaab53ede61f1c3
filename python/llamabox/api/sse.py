"""Server-sent events: the one place that frames them.

A stream is ``data: <json>\\n\\n`` per event, optionally ``data: [DONE]\\n\\n`` at the end. An
exception raised by the event source after the headers went out becomes a last
``data: {"error": {...}}`` event (and no ``[DONE]``), as llama.cpp and OpenAI send it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

from llamabox.api.errors import error_body, from_exception

__all__ = ["DONE", "CONTENT_TYPE", "event", "named_stream", "stream"]

CONTENT_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def stream(
    payloads: AsyncIterator[bytes], *, done: bool = True
) -> AsyncGenerator[bytes, None]:
    """Frame each JSON payload as an event; end with ``[DONE]`` (if ``done``) or an error event."""
    try:
        async for payload in payloads:
            yield event(payload)
    except Exception as exc:  # every failure becomes the stream's error event
        yield event(error_body(from_exception(exc)))
        return
    finally:
        aclose = getattr(payloads, "aclose", None)
        if aclose is not None:
            await aclose()
    if done:
        yield DONE


async def named_stream(
    events: AsyncIterator[tuple[str, bytes]],
    error_payload: Callable[[bytes], bytes] = lambda body: body,
) -> AsyncGenerator[bytes, None]:
    """Frame ``(name, JSON payload)`` pairs; a failure ends the stream with an ``error`` event
    whose payload is ``error_payload`` of the OpenAI error body."""
    try:
        async for name, payload in events:
            yield b"event: " + name.encode() + b"\n" + event(payload)
    except Exception as exc:  # every failure becomes the stream's error event
        yield b"event: error\n" + event(error_payload(error_body(from_exception(exc))))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
