"""Several models behind one endpoint: which engine serves a request's ``model``.

One engine per model, all in this process (bench/README.md, "Several models", says why not a
child process each). A model loads on first use; past ``--models-max`` loaded at once, a load
first unloads the least recently used idle one; an idle model unloads after ``--models-ttl``
seconds, or after what the last request's ``keep_alive`` (Ollama's) asked for.

A request leases the engine it uses until its response is over, stream included: the lease is
taken by :meth:`ModelRegistry.acquire` and given back when ``LlamaboxApp._http`` ends
(:meth:`ModelRegistry.open_request`, :meth:`ModelRegistry.close_request`). A leased engine is
never unloaded; a load that needs room while every loaded model is leased waits for one to be
given back. Loads and unloads run off the event loop (``Engine.start`` and ``Engine.stop`` use
the executor).

With one model and no ``--models-dir`` / ``--models-config`` (``ServerConfig.models`` None),
the registry holds that model, pinned: loaded at start-up by the app, never unloaded.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from contextvars import Context, ContextVar, Token
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import msgspec

from llamabox.api.errors import APIError
from llamabox.config import ModelConfig, ServerConfig
from llamabox.types import EngineConfig, ModelInfo

if TYPE_CHECKING:
    from llamabox.api.state import EngineLike

__all__ = ["EngineFactory", "ModelEntry", "ModelRegistry", "ModelStatusValue", "trim_heap"]

logger = logging.getLogger("llamabox.models")

EngineFactory = Callable[[EngineConfig], "EngineLike"]
ModelStatusValue = Literal["loaded", "loading", "unloaded"]  # llama-server's router's values


class _Lease(NamedTuple):
    registry: ModelRegistry
    entry: ModelEntry
    keep_alive: float | None  # seconds idle before the unload; None: the model's ttl
    touch: bool  # counts as a use (LRU order, idle timer)


# The leases of the request being served (open_request, in the request's task).
_leases: ContextVar[list[_Lease] | None] = ContextVar("llamabox_model_leases", default=None)
RequestLeases = Token[list[_Lease] | None]


class ModelEntry:
    """One model the server may serve: its engine, loaded or not, and how it is being used."""

    def __init__(
        self, spec: ModelConfig, config: ServerConfig, engine: EngineLike, *, pinned: bool
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.config = config  # the server's, with this model's engine, sampling and name
        self.engine = engine  # the same object across loads and unloads
        self.pinned = pinned
        path = Path(spec.engine.model)
        self.names = {spec.name, *spec.aliases, path.name, path.stem, str(path)}
        self.ttl: float | None = None  # the model's own idle seconds (None: never)
        self.idle_ttl: float | None = None  # what the last request asked for
        self.n_busy = 0  # leases held
        self.last_used = 0.0  # monotonic
        self.deadline: float | None = None  # monotonic time of the idle unload
        self.load_task: asyncio.Task[None] | None = None
        self.starting = False  # Engine.start is running (its memory counts)
        self.stopping = False
        self.unload_requested = False  # POST /models/unload while leased: once given back
        self.error: str | None = None  # why the last load failed
        self.info: ModelInfo | None = None  # from the last load
        self.load_seconds: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def status(self) -> ModelStatusValue:
        if self.engine.is_loaded and not self.stopping:
            return "loaded"
        if self.load_task is not None and not self.load_task.done():
            return "loading"
        return "unloaded"

    @property
    def resident(self) -> bool:
        """Holds memory: loaded, loading or still unloading."""
        return self.starting or self.stopping or self.engine.is_loaded

    @property
    def evictable(self) -> bool:
        """Idle and loaded: may be unloaded now."""
        return (
            self.n_busy == 0
            and self.engine.is_loaded
            and not (self.starting or self.stopping or self.pinned)
        )

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ModelRegistry:
    """Every model of the server, by name; loads, leases and unloads them (on the loop only)."""

    def __init__(
        self, config: ServerConfig, engine: EngineLike, factory: EngineFactory | None = None
    ) -> None:
        self.single = config.models is None
        self.max_loaded = config.models_max if not self.single else 0
        default_ttl = _idle_seconds(config.models_ttl, zero_is_never=True)
        specs = config.models or [
            ModelConfig(name=config.model_name, engine=config.engine, sampling=config.sampling)
        ]
        self.entries: list[ModelEntry] = []
        for i, spec in enumerate(specs):
            if i == 0:
                engine_i = engine
            elif factory is not None:
                engine_i = factory(spec.engine)
            else:
                raise ValueError("several models need an engine factory")
            model_config = config
            if not self.single:
                model_config = msgspec.structs.replace(
                    config, engine=spec.engine, sampling=spec.sampling, alias=spec.name
                )
            entry = ModelEntry(spec, model_config, engine_i, pinned=self.single)
            if spec.ttl is None:
                entry.ttl = default_ttl
            else:
                entry.ttl = _idle_seconds(spec.ttl, zero_is_never=True)
            entry.idle_ttl = entry.ttl
            self.entries.append(entry)
        self.default = self.entries[0]
        # The names each model was given first, then those taken from its file (first wins).
        self._by_name: dict[str, ModelEntry] = {}
        for entry in self.entries:
            for name in (entry.name, *entry.spec.aliases):
                self._by_name.setdefault(name, entry)
        for entry in self.entries:
            for name in sorted(entry.names):
                self._by_name.setdefault(name, entry)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # ---- names ----

    def find(self, name: str | None) -> ModelEntry:
        """The model ``name`` picks: its name, an alias, its file name, stem or path (``:latest``
        ok). No name: the default model. With a single model, any name picks it."""
        if not name:
            return self.default
        entry = self._by_name.get(name) or self._by_name.get(name.removesuffix(":latest"))
        if entry is None:
            if len(self.entries) == 1:
                return self.default
            raise APIError(
                404, f"The model '{name}' does not exist", param="model", code="model_not_found"
            )
        return entry

    def exists(self, name: str) -> bool:
        if len(self.entries) == 1:
            return name in self.default.names or name.removesuffix(":latest") in self.default.names
        return name in self._by_name or name.removesuffix(":latest") in self._by_name

    # ---- leases ----

    @staticmethod
    def open_request() -> RequestLeases:
        """Where the leases taken while serving one request go (call in the request's task)."""
        return _leases.set([])

    @staticmethod
    def close_request(token: RequestLeases) -> None:
        """The request is over: its leases are given back."""
        leases = _leases.get() or []
        _leases.reset(token)
        for lease in reversed(leases):
            lease.registry._release(lease)

    async def acquire(
        self,
        entry: ModelEntry,
        *,
        keep_alive: float | None = None,
        autoload: bool = True,
        touch: bool = True,
    ) -> None:
        """``entry`` loaded (loading it if needed, unless not ``autoload``) and leased until the
        request ends. ``keep_alive``: idle seconds after this request (negative: forever, 0: at
        once); None: the model's ttl. A lease that does not ``touch`` leaves the LRU order and
        the idle timer as they were (a GET of /props must not keep a model loaded)."""
        lease = _Lease(self, entry, keep_alive, touch)
        entry.n_busy += 1  # first: a model a request waits for is not unloaded meanwhile
        entry.cancel_timer()
        try:
            while entry.stopping or not entry.engine.is_loaded:
                if self._closing:
                    raise APIError(503, "Server is shutting down", headers={"Retry-After": "1"})
                if entry.stopping:
                    await self._changes()
                elif not autoload:
                    raise APIError(
                        503,
                        f"The model '{entry.name}' is not loaded (POST /models/load loads it)",
                        code="model_not_loaded",
                    )
                else:
                    await self._load(entry)
        except BaseException:
            self._release(lease)
            raise
        leases = _leases.get()
        if leases is None:  # outside a request: nothing holds it
            self._release(lease)
        else:
            leases.append(lease)

    # ---- explicit control (POST /models/load, /models/unload, keep_alive 0) ----

    def start_load(self, entry: ModelEntry) -> None:
        """Load ``entry`` in the background (llama-server's POST /models/load: the answer does
        not wait; /models shows the state). 400 when it is loaded or loading."""
        if entry.status != "unloaded":
            raise APIError(400, f"The model '{entry.name}' is already {entry.status}")
        entry.unload_requested = False
        self._spawn(self._load_quietly(entry))

    async def unload(self, entry: ModelEntry) -> None:
        """Unload ``entry`` now, or, while requests use it (or it loads), once they are done.
        400 when it is not loaded, or when it is the one model of a single-model server."""
        if self.single:
            raise APIError(
                400,
                f"The model '{entry.name}' is the only one and stays loaded (several models: "
                "--models-dir or --models-config)",
            )
        if entry.status == "unloaded":
            raise APIError(400, f"The model '{entry.name}' is not loaded")
        if entry.evictable:
            await self._unload(entry, "asked for")
        else:
            entry.unload_requested = True

    def unload_if_loaded(self, entry: ModelEntry) -> None:
        """Ollama's keep_alive 0 without a prompt: unload when idle, nothing if not loaded."""
        if not self.single and entry.status != "unloaded":
            entry.unload_requested = True
            self._settle(entry)

    def expires_at(self, entry: ModelEntry) -> float | None:
        """Wall-clock time of the idle unload; None: no unload planned (leased, or never)."""
        if entry.n_busy or entry.deadline is None or entry.pinned:
            return None
        return time.time() + max(entry.deadline - time.monotonic(), 0.0)

    # ---- life cycle ----

    def start(self) -> None:
        """Several models: load those marked load_on_startup, in the background."""
        if self.single:
            return
        for entry in self.entries:
            if entry.spec.load_on_startup:
                self._spawn(self._load_quietly(entry))

    async def close(self) -> None:
        """Stop every engine: loads waiting for room are dropped, running ones are waited for
        (a load in the executor cannot be interrupted), then every loaded engine is stopped."""
        self._closing = True
        self._notify()
        for entry in self.entries:
            entry.cancel_timer()
            task = entry.load_task
            if task is not None and not task.done() and not entry.starting:
                task.cancel()
        pending = [e.load_task for e in self.entries if e.load_task and not e.load_task.done()]
        pending += list(self._tasks)
        if pending:
            await asyncio.wait(pending)
        for entry in self.entries:
            if entry.pinned or entry.engine.is_loaded:
                try:
                    await entry.engine.stop()
                except Exception:
                    logger.exception("engine stop failed: %s", entry.name)

    # ---- inside ----

    async def _changes(self) -> None:
        """Until a model is given back, loaded, unloaded or fails to load."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Background work, in a context of its own (not the request's that caused it: its
        request id in the log lines, its leases)."""
        task = Context().run(asyncio.get_running_loop().create_task, work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_quietly(self, entry: ModelEntry) -> None:
        try:
            await self._load(entry)
        except (APIError, asyncio.CancelledError):
            pass  # logged by _run_load; the state says it
        if entry.n_busy == 0:
            self._settle(entry)

    async def _load(self, entry: ModelEntry) -> None:
        task = entry.load_task
        if task is None or task.done():
            task = entry.load_task = asyncio.get_running_loop().create_task(
                self._run_load(entry), name=f"llamabox-load-{entry.name}"
            )
        await asyncio.shield(task)  # a waiter that goes away does not stop the load

    async def _run_load(self, entry: ModelEntry) -> None:
        await self._make_room(entry)
        entry.starting = True
        entry.error = None
        started = time.perf_counter()
        try:
            await entry.engine.start()
        except Exception as exc:
            entry.error = " ".join(str(exc).split()) or type(exc).__name__
            logger.error("model %s failed to load: %s", entry.name, entry.error)
            raise APIError(
                500,
                f"The model '{entry.name}' failed to load: {entry.error}",
                code="model_load_failed",
            ) from None
        finally:
            entry.starting = False
            self._notify()
        entry.load_seconds = time.perf_counter() - started
        entry.info = entry.engine.model_info
        entry.last_used = time.monotonic()
        entry.deadline = None
        logger.info(
            "model %s loaded in %.1f s: %s (n_ctx_slot=%d, slots=%d)",
            entry.name,
            entry.load_seconds,
            entry.info.description,
            entry.info.n_ctx_slot,
            entry.spec.engine.n_parallel,
        )

    async def _make_room(self, entry: ModelEntry) -> None:
        """Until fewer than --models-max others hold memory: the least recently used idle one
        is unloaded; with none idle, wait for one to be."""
        waiting = False
        while self.max_loaded > 0:
            others = [e for e in self.entries if e is not entry and e.resident]
            if len(others) < self.max_loaded:
                return
            idle = [e for e in others if e.evictable]
            if idle:
                victim = min(idle, key=lambda e: e.last_used)
                await self._unload(victim, f"least recently used, to load {entry.name}")
                continue
            if not waiting:
                logger.info(
                    "model %s waits for room: %d loaded (--models-max), all in use",
                    entry.name,
                    len(others),
                )
                waiting = True
            await self._changes()

    async def _unload(self, entry: ModelEntry, why: str) -> None:
        if not entry.evictable:  # leased again since it was chosen, or already unloading
            return
        entry.stopping = True
        entry.unload_requested = False
        entry.cancel_timer()
        entry.deadline = None
        try:
            await entry.engine.stop()
            await asyncio.get_running_loop().run_in_executor(None, trim_heap)
        except Exception:
            logger.exception("engine stop failed: %s", entry.name)
        finally:
            entry.stopping = False
            self._notify()
        logger.info("model %s unloaded (%s)", entry.name, why)

    def _settle(self, entry: ModelEntry) -> None:
        """An idle model: unload it when asked or due, else arm the idle timer."""
        if entry.n_busy or entry.pinned or not entry.engine.is_loaded or entry.stopping:
            return
        if self._closing:
            return
        now = time.monotonic()
        if entry.deadline is None and entry.idle_ttl is not None:
            entry.deadline = now + entry.idle_ttl  # loaded, never used: counted from now
        if entry.unload_requested:
            self._spawn(self._unload(entry, "asked for"))
        elif entry.deadline is not None:
            delay = entry.deadline - now
            if delay <= 0:
                self._spawn(self._unload(entry, "idle"))
            else:
                entry.cancel_timer()
                entry._timer = asyncio.get_running_loop().call_later(
                    delay, self._expire, entry, context=Context()
                )

    def _release(self, lease: _Lease) -> None:
        entry = lease.entry
        entry.n_busy -= 1
        if lease.touch:
            now = time.monotonic()
            entry.last_used = now
            if lease.keep_alive is None:
                entry.idle_ttl = entry.ttl
            else:
                entry.idle_ttl = _idle_seconds(lease.keep_alive, zero_is_never=False)
            entry.deadline = None if entry.idle_ttl is None else now + entry.idle_ttl
        self._settle(entry)
        self._notify()

    def _expire(self, entry: ModelEntry) -> None:
        entry._timer = None
        if entry.evictable and not self._closing:
            ttl = entry.idle_ttl
            self._spawn(self._unload(entry, f"idle for {ttl:g} s" if ttl else "idle"))


_FOREVER_S = 1e9  # longer than this (31 years): no timer at all


def _idle_seconds(seconds: float, *, zero_is_never: bool) -> float | None:
    """Idle seconds before an unload; None: never (negative, too long, or 0 for a ttl:
    --models-ttl 0 means never, Ollama's keep_alive 0 means at once)."""
    if seconds < 0 or seconds > _FOREVER_S or (zero_is_never and seconds == 0):
        return None
    return seconds


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


def trim_heap() -> None:
    """Hand the allocator's free memory back to the system (glibc keeps most of an unloaded
    model's buffers otherwise: ~80 MiB of Gemma 3 270M's, bench/models.py). Milliseconds: off
    the loop. Nothing where there is no malloc_trim (musl, macOS, Windows)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
