"""Serve the ASGI app with granian: one worker in this process, since the model lives here.

granian's embedded server runs on our own asyncio loop, with the app object itself as target
(no import string, no child process). The engine loads in the app's lifespan, in the background,
so ``/health`` answers 503 while it loads.

SIGTERM / SIGINT: granian stops accepting connections and waits for the requests in flight;
after ``config.timeout`` seconds those still running are cancelled (freeing their slots); then
the lifespan stops the engine and :func:`run_server` returns. A second signal cancels them at
once.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from llamabox.api.app import LlamaboxApp, create_app
from llamabox.config import ServerConfig
from llamabox.logs import setup_logging
from llamabox.types import ModelLoadError

__all__ = ["run_server"]

logger = logging.getLogger("llamabox.server")


def run_server(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT. Raises ModelLoadError when the model cannot be loaded.

    On uvloop where it is installed (every platform but Windows): granian hands each request
    to the loop from its own thread, and uvloop's wake-ups and timers cost less than asyncio's
    (measured: /v1/models +15%, a short /tokenize +40% requests a second).
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
        return
    uvloop.run(serve(config))


async def serve(config: ServerConfig, app: LlamaboxApp | None = None) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    app = app or create_app(config)
    server = Server(
        app,
        address=config.host,
        port=config.port,
        interface=Interfaces.ASGI,
        websockets=False,
        backlog=1024,
    )
    setup_logging(config.log_format, config.verbose)  # after granian's own dictConfig
    logging.getLogger("_granian").addFilter(_NotExperimental())

    loop = asyncio.get_running_loop()
    load_errors: list[BaseException] = []
    abort_timer: asyncio.TimerHandle | None = None

    def stop(reason: str) -> None:
        nonlocal abort_timer
        if abort_timer is not None:  # second signal: no more waiting
            logger.warning("%s again: cancelling requests in flight", reason)
            app.abort_requests()
            return
        logger.info("%s: shutting down (requests in flight get %.0f s)", reason, config.timeout)
        app.closing = True
        server.stop()  # type: ignore[no-untyped-call]
        abort_timer = loop.call_later(config.timeout, app.abort_requests)

    def on_load_error(exc: BaseException) -> None:
        load_errors.append(exc)
        stop("model failed to load")

    app.on_fatal = on_load_error
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop, sig.name)
    try:
        await server.serve()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if abort_timer is not None:
            abort_timer.cancel()
    if load_errors:
        raise ModelLoadError(str(load_errors[0]))
    logger.info("stopped")


class _NotExperimental(logging.Filter):
    """granian warns that embedding it is experimental; we chose it knowingly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "experimental" not in record.getMessage()
