"""The ASGI application: lifespan (engine load and stop), routing, auth, CORS, request ids,
client-disconnect cancellation and graceful draining.

The model loads in the background once the lifespan starts, so the server listens at once and
``/health`` answers 503 "Loading model" until it is ready (then 200 ``{"status": "ok"}``).
With several models (``--models-dir``, ``--models-config``) each loads on first use
(``api/models_registry.py``) and ``/health`` is 200 once the server listens, as llama-server's
router answers: ``GET /models`` says the state of each.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from llamabox.api import (
    lora,
    messages,
    metrics,
    model_routes,
    native,
    ollama,
    openai,
    rerank,
    responses,
    slot_files,
)
from llamabox.api.errors import APIError, error_body, from_exception, ollama_body
from llamabox.api.http import (
    ClientDisconnected,
    Headers,
    Receive,
    Request,
    Response,
    Route,
    Router,
    Scope,
    Send,
    StreamResponse,
    api_key_ok,
    cors_headers,
    json_response,
    read_body,
    send_response,
)
from llamabox.api.models_registry import EngineFactory
from llamabox.api.state import AppState, EngineLike
from llamabox.config import ServerConfig
from llamabox.logs import request_id_var

__all__ = ["LlamaboxApp", "create_app"]

logger = logging.getLogger("llamabox.http")

Handled = Response | StreamResponse


async def health(req: Request, state: AppState) -> Response:
    if not state.models.single:
        return json_response({"status": "ok"})
    if state.load_error is not None:
        raise APIError(500, f"Model failed to load: {state.load_error}")
    if not state.engine.is_loaded:
        raise APIError(503, "Loading model")
    if (failure := state.engine.failure) is not None:
        raise APIError(503, failure)
    return json_response({"status": "ok"})


class LlamaboxApp:
    """ASGI callable. ``startup``/``shutdown`` are what the lifespan protocol runs."""

    def __init__(
        self, config: ServerConfig, engine: EngineLike, engine_factory: EngineFactory | None = None
    ) -> None:
        self.config = config
        self.state = AppState(config, engine, engine_factory)
        self.router: Router[AppState] = Router(
            [
                Route("GET", "/health", health, public=True, needs_model=False),
                Route("GET", "/v1/health", health, public=True, needs_model=False),
                *metrics.routes(),
                *native.routes(),
                *slot_files.routes(),
                *lora.routes(),
                *rerank.routes(),
                *openai.routes(),
                *responses.routes(),
                *messages.routes(),
                *ollama.routes(),
                *model_routes.routes(),
            ]
        )
        self._keys = [key.encode() for key in config.api_keys]
        self._requests: dict[asyncio.Task[object], Request] = {}
        self._aborted: set[asyncio.Task[object]] = set()  # cancelled by us, not by the server
        self._reading: set[asyncio.Task[object]] = set()  # still reading their request body
        self._idle: asyncio.Event | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.closing = False
        self.on_fatal: Callable[[BaseException], None] | None = None  # the model failed to load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def startup(self) -> None:
        """Start loading the model in the background; requests get 503 until it is loaded."""
        self._idle = asyncio.Event()
        self._idle.set()
        if not self.state.models.single:
            self.state.models.start()
        elif not self.state.engine.is_loaded and self.load_task is None:
            self.load_task = asyncio.create_task(self._load(), name="llamabox-load")

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            await self.state.engine.start()
        except Exception as exc:
            self.state.load_error = exc
            logger.error("model failed to load: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        info = self.state.engine.model_info
        logger.info(
            "model loaded in %.1f s: %s (%s, n_ctx_slot=%d, slots=%d)",
            time.perf_counter() - started,
            self.state.model_name,
            info.description,
            info.n_ctx_slot,
            self.config.engine.n_parallel,
        )

    async def shutdown(self) -> None:
        """Refuse new requests, let in-flight ones finish (bounded by ``timeout``), stop."""
        self.closing = True
        await self.drain(self.config.timeout)
        if self.load_task is not None and not self.load_task.done():
            await asyncio.wait([self.load_task])  # the load runs off the loop; let it end
        await self.state.models.close()

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight requests; cancel those still running after ``timeout`` seconds.

        Requests still reading their body have started nothing: they are cancelled at once.
        (A client that closes its connection while its body is awaited is not always reported
        by granian 2.8; such a request would otherwise hold the shutdown for ``timeout``.)
        """
        for task in list(self._reading):
            self._aborted.add(task)
            task.cancel()
        if self._reading:
            await asyncio.wait(list(self._reading), timeout=5.0)
        if self._requests and self._idle is not None:
            logger.info("waiting for %d in-flight request(s)", len(self._requests))
            for task, req in self._requests.items():
                logger.info("in flight: %s %s, awaiting %s", req.method, req.path, _awaiting(task))
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if self._requests:
            self.abort_requests()
            await asyncio.wait(list(self._requests), timeout=5.0)

    def abort_requests(self) -> None:
        """Cancel every in-flight request (their slots free by the next engine step)."""
        if self._requests:
            logger.warning("cancelling %d in-flight request(s)", len(self._requests))
        for task in list(self._requests):
            self._aborted.add(task)
            task.cancel()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = Request(scope)
        token = request_id_var.set(req.request_id)
        task: asyncio.Task[object] = asyncio.current_task()  # type: ignore[assignment]
        self._requests[task] = req
        if self._idle is not None:
            self._idle.clear()
        started = time.perf_counter()
        status = 499  # client closed the request, unless we get to answer
        watcher: asyncio.Task[None] | None = None
        generates = False
        leases = self.state.models.open_request()
        try:
            prepared = await self._prepare(req, receive)
            if isinstance(prepared, Route):
                generates = prepared.generates
                if generates:
                    watcher = asyncio.create_task(self._watch_disconnect(receive, task))
                response = await self._call(prepared, req)
            else:
                response = prepared
            status = response.status
            await send_response(send, response, self._headers(req))
        except asyncio.CancelledError:
            if task not in self._aborted:
                raise
            if sys.version_info >= (3, 11):
                task.uncancel()
        except ClientDisconnected:
            pass
        except Exception:  # failures while streaming: headers are out, nothing more to send
            logger.exception("response failed")
        finally:
            if watcher is not None:
                watcher.cancel()
            self.state.models.close_request(leases)  # the models it used are free again
            self._requests.pop(task, None)
            self._aborted.discard(task)
            if not self._requests and self._idle is not None:
                self._idle.set()
            # One line per generation; the cheap requests (health checks, /v1/models, /tokenize
            # at thousands a second) only with --verbose, as llama.cpp's server does.
            level = logging.INFO if generates or status >= 500 else logging.DEBUG
            if logger.isEnabledFor(level):
                ms = 1e3 * (time.perf_counter() - started)
                logger.log(level, "%s %s %d %.1f ms", req.method, req.path, status, ms)
            request_id_var.reset(token)

    async def _watch_disconnect(self, receive: Receive, task: asyncio.Task[object]) -> None:
        """Cancel ``task`` when the client goes away (so its generation stops).

        Started only once the body is read in full: a receive() issued while the body is still
        being read takes body chunks from the reader (or, racing its end, gets http.disconnect).
        After the body, granian's receive() waits until the response is complete or the client
        is gone (hyper dropped the response), then answers http.disconnect; the first cannot
        happen here, as the watcher is cancelled right after the response is sent.
        """
        while (await receive())["type"] != "http.disconnect":
            pass
        self._aborted.add(task)
        task.cancel()

    async def _prepare(self, req: Request, receive: Receive) -> Route[AppState] | Response:
        """The route (body read), or the answer when it is already known (error, OPTIONS)."""
        route: Route[AppState] | None = None
        try:
            if req.method == "OPTIONS":
                return self._options(req)
            route, req.path_params = self.router.match(req.method, req.path)
            if not route.public and self._keys and not api_key_ok(req.headers, self._keys):
                raise APIError(401, "Invalid API Key", code="invalid_api_key")
            if self.closing and route.generates:
                raise APIError(503, "Server is shutting down", headers={"Retry-After": "1"})
            if route.needs_model and self.state.models.single:
                self._check_ready()
            if req.method == "POST":
                task: asyncio.Task[object] = asyncio.current_task()  # type: ignore[assignment]
                self._reading.add(task)
                try:
                    req.body = await read_body(
                        receive, req, self.config.max_body_bytes, self.config.timeout
                    )
                finally:
                    self._reading.discard(task)
            return route
        except ClientDisconnected:
            raise
        except asyncio.TimeoutError:
            return self._error(APIError(408, "Request body not received in time"), route)
        except Exception as exc:
            return self._error(exc, route, req.path.startswith("/api/"))

    def _check_ready(self) -> None:
        if self.state.load_error is not None:
            raise APIError(500, f"Model failed to load: {self.state.load_error}")
        if not self.state.engine.is_loaded:
            raise APIError(503, "Loading model", headers={"Retry-After": "1"})

    async def _call(self, route: Route[AppState], req: Request) -> Handled:
        try:
            state = self.state
            if route.needs_model and not route.picks_model and not state.models.single:
                state = await self._model_of(route, req)
            return await route.handler(req, state)
        except Exception as exc:
            return self._error(exc, route)

    async def _model_of(self, route: Route[AppState], req: Request) -> AppState:
        """Several models: the state of the one ``?model=`` names (llama-server's router's way
        for GET routes), for a route whose body names none. A GET is not counted as a use."""
        query = req.query
        autoload = route.autoload
        if "autoload" in query:
            autoload = query["autoload"].strip().lower() in ("1", "true", "on", "yes")
        return await self.state.use_model(
            query.get("model"), autoload=autoload, touch=req.method != "GET"
        )

    def _error(
        self, exc: BaseException, route: Route[AppState] | None, ollama: bool = False
    ) -> Response:
        err = from_exception(exc)
        body = ollama_body(err) if (route.ollama if route else ollama) else error_body(err)
        return Response(body, err.status, headers=err.headers)

    def _options(self, req: Request) -> Response:
        allowed = self.router.allowed_methods(req.path)
        if allowed is None:
            raise APIError(404, f"File Not Found: OPTIONS {req.path}")
        return Response(b"", 204, headers={"Allow": ", ".join([*allowed, "OPTIONS"])})

    def _headers(self, req: Request) -> Headers:
        headers: Headers = [(b"x-request-id", req.request_id.encode())]
        if self.config.cors_origins:
            headers += cors_headers(
                req.headers.get("origin"), self.config.cors_origins, req.method == "OPTIONS"
            )
        return headers


def _awaiting(task: asyncio.Task[object]) -> str:
    """Where a suspended request waits: the innermost coroutine of its await chain."""
    where, coro = "?", cast(Any, task.get_coro())
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            where = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return where


def create_app(
    config: ServerConfig,
    engine: EngineLike | None = None,
    engine_factory: EngineFactory | None = None,
) -> LlamaboxApp:
    """The ASGI app serving ``config``; builds ``llamabox.engine.Engine`` unless given one.
    With several models (``config.models``), ``engine`` is the default model's and
    ``engine_factory`` makes the others' (default: ``Engine``)."""
    if engine is None or (engine_factory is None and config.models is not None):
        from llamabox.engine import Engine

        engine = engine or Engine(config.engine)
        engine_factory = engine_factory or Engine
    return LlamaboxApp(config, engine, engine_factory)
