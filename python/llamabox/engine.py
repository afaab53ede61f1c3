"""The async facade over the native engine.

The C++ engine runs its decode loop on its own thread. After each step that produced output it
makes a pipe readable; the asyncio loop watches that pipe (``add_reader``) and drains every
request's events in one go, so the loop wakes once per engine step, not once per token.

Nothing slow runs on the event loop. Preparing a request (tokenizing its prompt, rendering a chat
template, turning a JSON schema into a grammar, building the samplers) is a job for the engine's
low-priority C++ threads, which never hold the GIL; its result comes back through the same
pipe wake-up as the events. Other requests' streams keep flowing, the decode threads keep their
cores, and the loop spends microseconds on a job whatever its size. Small inputs skip the hop
(it would cost more than the work). Errors are still raised by the awaited call, before any
response has started.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from llamabox import _core
from llamabox.types import (
    ContextLengthError,
    EmbeddingResult,
    EngineConfig,
    EngineStats,
    EngineStoppedError,
    FinishReason,
    GenerateRequest,
    GenerationError,
    GenerationOutput,
    InvalidRequestError,
    LoraAdapter,
    ModelInfo,
    ModelLoadError,
    QueueFullError,
    RerankResult,
    SlotInfo,
    SpeculativeConfig,
    TokenLogprob,
    TopLogprob,
    Usage,
)

logger = logging.getLogger("llamabox.engine")

_FINISH: dict[int, FinishReason] = {
    _core.FINISH_STOP: "stop",
    _core.FINISH_LENGTH: "length",
    _core.FINISH_CANCELLED: "cancelled",
    _core.FINISH_ERROR: "error",
}
_POOLING = {"model": -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
POOLING_RANK = 4
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}

# Up to this size (characters of text, or tokens) the work takes well under a millisecond
# (llama.cpp tokenizes ~3 characters a microsecond on Gemma 3; a sampler without a grammar
# is built in ~20 us): done on the loop, where a job's hop would cost more than it saves and
# let the request trail others that arrive with it.
INLINE_MAX = 1024
_json = msgspec.json.Encoder()
T = TypeVar("T")


def _engine_params(config: EngineConfig) -> _core.EngineParams:
    p = _core.EngineParams()
    p.model_path = config.model
    p.n_ctx = config.n_ctx
    p.n_parallel = config.n_parallel
    p.n_batch = config.n_batch
    p.n_ubatch = config.n_ubatch
    p.n_threads = config.n_threads
    p.n_threads_batch = config.n_threads_batch
    p.n_gpu_layers = config.n_gpu_layers
    p.rpc_servers = list(config.rpc_servers)
    p.flash_attn = _FLASH_ATTN[config.flash_attn]
    p.cache_type_k = config.cache_type_k
    p.cache_type_v = config.cache_type_v
    p.use_mmap = config.use_mmap
    p.use_mlock = config.use_mlock
    p.repack = config.repack
    p.seed = config.seed
    p.kv_unified = config.kv_unified
    p.swa_full = config.swa_full
    p.n_queue_max = config.n_queue_max
    p.embeddings = config.embeddings or config.rerank
    p.pooling = _POOLING["rank" if config.rerank else config.pooling]
    p.loras = [_core.LoraAdapterParams(path, 1.0) for path in config.lora] + [
        _core.LoraAdapterParams(path, scale) for path, scale in config.lora_scaled
    ]
    p.lora_init_without_apply = config.lora_init_without_apply
    p.chat_template = config.chat_template or ""
    if config.mmproj:
        mp = _core.MediaParams()
        mp.path = config.mmproj
        mp.use_gpu = config.mmproj_offload
        mp.image_min_tokens = config.image_min_tokens
        mp.image_max_tokens = config.image_max_tokens
        mp.max_image_side = config.visual_max_image_size
        mp.n_cache = config.max_projected_cache
        p.media = mp
    p.speculative = _speculative_params(config.speculative)
    p.verbose = config.verbose
    return p


def _speculative_params(config: SpeculativeConfig) -> _core.SpeculativeParams:
    sp = _core.SpeculativeParams()
    sp.types = list(config.types)
    for field in (
        "n_max",
        "n_min",
        "p_min",
        "adaptive",
        "draft_n_gpu_layers",
        "draft_n_ctx",
        "draft_n_threads",
        "draft_n_threads_batch",
        "draft_cache_type_k",
        "draft_cache_type_v",
        "ngram_mod_n_match",
        "ngram_mod_n_min",
        "ngram_mod_n_max",
    ):
        setattr(sp, field, getattr(config, field))
    sp.draft_model = config.draft_model or ""
    sp.draft_devices = list(config.draft_devices)
    for name in ("ngram_simple", "ngram_map_k", "ngram_map_k4v"):
        src, dst = getattr(config, name), _core.NgramMapParams()
        dst.size_n, dst.size_m, dst.min_hits = src.size_n, src.size_m, src.min_hits
        setattr(sp, name, dst)
    sp.lookup_cache_static = config.lookup_cache_static or ""
    sp.lookup_cache_dynamic = config.lookup_cache_dynamic or ""
    return sp


def _invalid(e: _core.InvalidRequest) -> InvalidRequestError:
    """The Python error for a C++ invalid_request: args are (message, param[, counts])."""
    if isinstance(e, _core.ContextLength):
        message, _, n_prompt, n_ctx_slot = e.args
        return ContextLengthError(n_prompt, n_ctx_slot)
    message, param = e.args if len(e.args) == 2 else (str(e), None)
    return InvalidRequestError(message, param=param)


def _media_param(e: InvalidRequestError, request: GenerateRequest) -> InvalidRequestError:
    """The engine names a media input media[i]: the error names where it came from instead."""
    m = re.fullmatch(r"media\[(\d+)\]", e.param or "")
    if m is None or not request.media:
        return e
    i = int(m.group(1))
    if i >= len(request.media):
        return e
    where = request.media[i].param
    return InvalidRequestError(str(e).replace(f"media[{i}]", where), param=where)


def _set(target: Any, field: str, value: Any, param: str) -> None:
    """One field of a native struct; a value its C++ type cannot hold is the caller's error."""
    try:
        setattr(target, field, value)
    except TypeError:
        raise InvalidRequestError(f"{param} is out of range", param=param) from None


def _native_request(request: GenerateRequest, max_tokens: int) -> _core.Request:
    req = _core.Request()
    if isinstance(request.prompt, str):
        req.text = request.prompt
        req.add_special = request.add_special
        req.parse_special = request.parse_special
        if request.media:
            req.media = [m.data for m in request.media]
    else:
        req.prompt = _token_list(request.prompt, "prompt")
    _set(req, "n_predict", max_tokens, "max_tokens")
    req.stop = list(request.stop)
    req.cache_prompt = request.cache_prompt
    if request.speculative is not None:
        o, so = request.speculative, _core.SpeculativeOverride()
        if o.n_max is not None:
            _set(so, "n_max", o.n_max, "speculative.n_max")
        if o.n_min is not None:
            _set(so, "n_min", o.n_min, "speculative.n_min")
        if o.p_min is not None:
            _set(so, "p_min", o.p_min, "speculative.p_min")
        so.type = o.type or ""
        req.speculative = so
    if request.lora is not None:
        _set(req, "lora", [(i, float(scale)) for i, scale in request.lora], "lora")
        req.has_lora = True
    req.tag = request.request_id or ""
    sp, s = request.sampling, req.sampling
    for field in (
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "presence_penalty",
        "frequency_penalty",
        "ignore_eos",
        "n_probs",
    ):
        _set(s, field, getattr(sp, field), field)
    _set(s, "seed", -1 if sp.seed is None else sp.seed, "seed")
    _set(s, "logit_bias", list(sp.logit_bias.items()), "logit_bias")
    s.grammar = sp.grammar or ""
    s.json_schema = sp.json_schema or ""
    if sp.tool_grammar is not None:
        tg = sp.tool_grammar
        s.grammar = tg.grammar
        s.tool_grammar = True
        s.grammar_lazy = tg.lazy
        s.grammar_triggers = list(tg.triggers)
        s.preserved_tokens = list(tg.preserved_tokens)
        s.generation_prompt = tg.generation_prompt
    s.logprobs = sp.logprobs or sp.n_probs > 0
    return req


class RequestStream:
    """The outputs of one request, as an async iterator.

    Outputs the reader has not taken yet are merged, so a slow reader holds at most one pending
    output however fast the engine runs. Cancelling the reading task cancels the request.
    """

    def __init__(self, engine: Engine, id_req: int) -> None:
        self._engine = engine
        self.id_req = id_req
        self._items: collections.deque[GenerationOutput | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False  # the engine sent the last event
        self._exhausted = False  # the reader took the last output
        self._merge = True

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        while not self._items:
            if self._exhausted or self._finished:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._exhausted = True
            raise item
        if item.finish_reason is not None:
            self._exhausted = True
        return item

    def cancel(self) -> None:
        """Stops the request; its slot is free by the next engine step. Idempotent."""
        if not self._finished:
            self._engine._cancel(self.id_req)
        self._exhausted = True

    async def aclose(self) -> None:
        self.cancel()

    def keep_outputs(self) -> None:
        """Queue every output as the engine made it, unmerged (a paced reader, which takes them
        at its own rate, wants them one engine step at a time)."""
        self._merge = False

    def __del__(self) -> None:
        # A stream dropped unread must not hold its slot until max_tokens.
        if not self._finished:
            self._engine._cancel(self.id_req)

    def _push(self, item: GenerationOutput | BaseException) -> None:
        last = self._items[-1] if self._items else None
        if (
            self._merge
            and isinstance(item, GenerationOutput)
            and isinstance(last, GenerationOutput)
            and last.finish_reason is None
        ):
            last.text += item.text
            last.token_ids.extend(item.token_ids)
            if item.logprobs is not None:
                last.logprobs = (last.logprobs or []) + item.logprobs
            last.finish_reason = item.finish_reason
            last.stop_word = item.stop_word
            last.usage = item.usage
        else:
            self._items.append(item)
        if isinstance(item, BaseException) or (
            isinstance(item, GenerationOutput) and item.finish_reason is not None
        ):
            self._finished = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Engine:
    """Owns the native engine; every method is called from one asyncio loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._core: _core.Engine | None = None
        self._info: ModelInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[int, asyncio.Future[Any]] = {}
        # Weak: a stream its reader dropped is collected, and its __del__ cancels the request.
        self._streams: weakref.WeakValueDictionary[int, RequestStream] = (
            weakref.WeakValueDictionary()
        )
        self._embed_waiters: dict[int, asyncio.Future[_core.Event]] = {}
        self._ids = itertools.count(1)
        self._pieces: dict[int, bytes] = {}
        self._failure: str | None = None
        self._progress: _core.LoadProgress | None = None  # while start() loads the model

    # ---- lifecycle ----

    @property
    def load_progress(self) -> float | None:
        """While the model loads, how much of its weights has been read (0..1); else None."""
        return None if self._progress is None else self._progress.value

    @property
    def is_loaded(self) -> bool:
        return self._core is not None

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer generate (a ggml RPC server went away), else None."""
        return self._failure

    async def start(self) -> None:
        if self._core is not None:
            return
        loop = asyncio.get_running_loop()
        params = _engine_params(self.config)
        params.progress = self._progress = _core.LoadProgress()
        try:
            core = await loop.run_in_executor(None, _core.Engine, params)
        except _core.LoadError as e:
            raise ModelLoadError(str(e)) from None
        finally:
            self._progress = None
        core.start()
        loop.add_reader(core.notify_fd(), self._dispatch)
        self._loop = loop
        self._core = core
        self._failure = None  # a failure (a lost RPC server) was the last engine's
        self._info = self._model_info(core)

    async def stop(self) -> None:
        core, self._core = self._core, None
        if core is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(core.notify_fd())
        await self._loop.run_in_executor(None, core.stop)
        self._deliver(core.poll_events())
        jobs, self._jobs = self._jobs, {}
        for fut in jobs.values():
            if not fut.done():
                fut.set_exception(EngineStoppedError("the engine stopped"))
        for stream in list(self._streams.values()):
            stream._push(EngineStoppedError("the engine stopped"))
        self._streams.clear()
        for fut in self._embed_waiters.values():
            if not fut.done():
                fut.set_exception(EngineStoppedError("the engine stopped"))
        self._embed_waiters.clear()
        # The last reference goes on an executor thread, where the native engine is freed
        # (with the GIL released): freeing a large model must not stall the loop.
        last = [core]
        del core
        await self._loop.run_in_executor(None, last.clear)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _require(self) -> _core.Engine:
        if self._core is None:
            raise EngineStoppedError("the engine is not running")
        if self._failure is not None:
            raise EngineStoppedError(self._failure)
        return self._core

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineStoppedError("the engine is not running")
        return self._info

    async def _off_loop(
        self, inline: bool, run: Callable[..., T], post: Callable[..., None], *args: Any
    ) -> T:
        """``run(*args)`` here when ``inline``, else ``post(id_job, *args)``: a job whose result
        the engine hands back (see _dispatch). C++ errors become this module's."""
        try:
            if inline:
                return run(*args)
            id_job = next(self._ids)
            fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._jobs[id_job] = fut
            try:
                post(id_job, *args)
                return await fut
            finally:
                self._jobs.pop(id_job, None)  # a cancelled wait: the result is dropped
        except _core.InvalidRequest as e:
            raise _invalid(e) from None

    # ---- generation ----

    async def generate(self, request: GenerateRequest) -> RequestStream:
        """Validates and submits (raising here on bad input or a full queue)."""
        [stream] = await self.generate_choices(request, 1)
        return stream

    async def generate_choices(self, request: GenerateRequest, n: int) -> list[RequestStream]:
        """``n`` completions of one prompt, tokenized once; choice j samples with seed + j.

        All are queued or none is; errors are raised here, before anything streams.
        """
        core = self._require()
        if n < 1:
            raise InvalidRequestError("n must be at least 1", param="n")
        max_tokens = request.max_tokens if request.max_tokens is not None else self.config.n_predict
        native = _native_request(request, max_tokens)
        ids = [next(self._ids) for _ in range(n)]
        sp = request.sampling
        # Media are decoded and encoded in prepare: always a job, off the loop.
        inline = (
            not (sp.grammar or sp.json_schema or request.media)
            and len(request.prompt) <= INLINE_MAX
        )
        try:
            prepared = await self._off_loop(inline, core.prepare, core.post_prepare, native, ids)
        except InvalidRequestError as e:
            raise _media_param(e, request) from None
        streams = [RequestStream(self, id_req) for id_req in ids]
        for stream in streams:
            self._streams[stream.id_req] = stream
        try:
            _submit_all(core, [prepared])
        except BaseException:
            for id_req in ids:
                self._streams.pop(id_req, None)
            raise
        return streams

    def _cancel(self, id_req: int) -> None:
        if self._core is not None:
            self._core.cancel(id_req)

    # ---- embeddings ----

    async def embed(self, inputs: Sequence[str] | Sequence[list[int]]) -> list[EmbeddingResult]:
        """L2-normalized embeddings, in a context of their own (no slot is taken)."""
        core = self._require()
        if not self.model_info.embeddings:
            raise InvalidRequestError("this server was started without embeddings (--embeddings)")
        if core.info.pooling == POOLING_RANK:
            raise InvalidRequestError(
                "this server reranks (--rerank): its model pools into relevance scores, not "
                "embeddings; POST /v1/rerank"
            )
        if not inputs:
            raise InvalidRequestError("the input is empty", param="input")
        reqs = []
        for item in inputs:
            req = _core.Request()
            req.kind = _core.KIND_EMBEDDING
            if isinstance(item, str):
                req.text = item
                req.parse_special = False
            else:
                req.prompt = _token_list(item, "input")
            reqs.append(req)
        events = await self._run_embeddings(reqs, sum(len(x) for x in inputs) <= INLINE_MAX)
        pooled = core.info.pooling != 0
        results = []
        for ev in events:
            emb = ev.embedding
            vec: list[float] | list[list[float]] = emb[0].tolist() if pooled else emb.tolist()
            results.append(EmbeddingResult(embedding=vec, prompt_tokens=ev.n_prompt))
        return results

    async def rerank(self, query: str, documents: Sequence[str]) -> list[RerankResult]:
        """A relevance score of each document for the query, in the documents' order (the
        model's rank head over the pair, as its rerank template or separators lay it out)."""
        core = self._require()
        if core.info.pooling != POOLING_RANK:
            raise InvalidRequestError("this server was started without reranking (--rerank)")
        reqs = []
        for doc in documents:
            req = _core.Request()
            req.kind = _core.KIND_EMBEDDING
            req.rerank = True
            req.text = query
            req.document = doc
            reqs.append(req)
        results: list[RerankResult] = []
        # In chunks that one embedding batch takes: any number of documents, a bounded queue.
        chunk = 32
        for start in range(0, len(reqs), chunk):
            part = documents[start : start + chunk]
            inline = (len(query) + 1) * len(part) + sum(map(len, part)) <= INLINE_MAX
            events = await self._run_embeddings(
                reqs[start : start + chunk], inline, "documents", start
            )
            results += [RerankResult(float(ev.embedding[0][0]), ev.n_prompt) for ev in events]
        return results

    async def _run_embeddings(
        self, reqs: list[_core.Request], inline: bool, what: str = "input", first: int = 0
    ) -> list[_core.Event]:
        """Prepares (tokenizes) and submits embedding requests, all or none; their final events.
        An input that cannot be taken is a 400 naming it (``what[first + i]``)."""
        core = self._require()
        loop = asyncio.get_running_loop()
        ids = [next(self._ids) for _ in reqs]

        async def prepare(i: int, req: _core.Request, id_req: int) -> Any:
            try:
                return await self._off_loop(inline, core.prepare, core.post_prepare, req, [id_req])
            except InvalidRequestError as e:
                if len(reqs) == 1 and first == 0 and what == "input":
                    raise
                raise InvalidRequestError(f"{what}[{first + i}]: {e}", param=what) from None

        batches = await asyncio.gather(
            *(
                prepare(i, req, id_req)
                for i, (req, id_req) in enumerate(zip(reqs, ids, strict=True))
            )
        )
        futures: list[asyncio.Future[_core.Event]] = []
        for id_req in ids:
            fut: asyncio.Future[_core.Event] = loop.create_future()
            self._embed_waiters[id_req] = fut
            futures.append(fut)
        try:
            _submit_all(core, batches)
            events = await asyncio.gather(*futures)
        except BaseException:
            for id_req in ids:
                if self._embed_waiters.pop(id_req, None) is not None:
                    core.cancel(id_req)
            raise
        for ev in events:
            if ev.finish != _core.FINISH_STOP or ev.embedding is None:
                raise GenerationError(ev.error or "embedding failed")
        return list(events)

    # ---- LoRA adapters ----

    def lora_adapters(self) -> list[LoraAdapter]:
        """The loaded adapters (ids in --lora, then --lora-scaled order) and current scales."""
        return [LoraAdapter(a.id, a.path, a.scale) for a in self._require().lora_adapters()]

    def set_lora_scales(self, scales: Sequence[tuple[int, float]]) -> None:
        """The server's scales from now on (requests without ``lora``): (id, scale) pairs,
        the adapters not named off."""
        try:
            self._require().set_lora_scales([(i, float(x)) for i, x in scales])
        except _core.InvalidRequest as e:
            raise _invalid(e) from None

    # ---- slots ----

    async def slot_action(self, id_slot: int, action: str, path: str = "") -> dict[str, Any]:
        """``save`` slot ``id_slot``'s KV cache to ``path``, ``restore`` it from there, or
        ``erase`` it: between two engine steps, with the slot idle (else InvalidRequestError)."""
        core = self._require()
        id_job = next(self._ids)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._jobs[id_job] = fut
        try:
            core.post_slot_action(id_job, id_slot, action, path)
            text = await fut
        except _core.InvalidRequest as e:
            raise _invalid(e) from None
        except _core.EngineStopped as e:
            raise EngineStoppedError(str(e)) from None
        finally:
            self._jobs.pop(id_job, None)
        return dict(msgspec.json.decode(text))

    # ---- events ----

    def _dispatch(self) -> None:
        if self._core is None:
            return
        self._deliver(self._core.poll_events())
        for id_job, value, error in self._core.poll_jobs():
            fut = self._jobs.get(id_job)
            if fut is None or fut.done():
                continue  # its waiter was cancelled
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
        if self._failure is None and (failure := self._core.failure()) is not None:
            self._fail_all(failure)

    def _fail_all(self, failure: str) -> None:
        """The engine can no longer generate (its decode thread is stuck in a call to a lost RPC
        server): every request in flight ends with that error, and so does every new one."""
        self._failure = failure
        logger.error("%s", failure)
        error = EngineStoppedError(failure)
        for stream in list(self._streams.values()):
            stream._push(error)
        self._streams.clear()
        for fut in self._embed_waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._embed_waiters.clear()

    def _deliver(self, events: list[_core.Event]) -> None:
        for ev in events:
            fut = self._embed_waiters.pop(ev.id_req, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(ev)
                continue
            stream = self._streams.get(ev.id_req)
            if stream is None:
                continue
            if ev.finish != _core.FINISH_NONE:
                self._streams.pop(ev.id_req, None)
            if ev.finish == _core.FINISH_ERROR:
                if ev.text or ev.tokens:
                    stream._push(GenerationOutput(text=ev.text, token_ids=list(ev.tokens)))
                error = InvalidRequestError if ev.bad_request else GenerationError
                stream._push(error(ev.error or "generation failed"))
                continue
            stream._push(self._output(ev))

    def _output(self, ev: _core.Event) -> GenerationOutput:
        out = GenerationOutput(text=ev.text, token_ids=list(ev.tokens))
        if ev.logprobs:
            out.logprobs = [
                TokenLogprob(
                    token=lp.token,
                    text=self._piece(lp.token),
                    logprob=lp.logprob,
                    top=[TopLogprob(t, self._piece(t), v) for t, v in lp.top],
                )
                for lp in ev.logprobs
            ]
        if ev.finish != _core.FINISH_NONE:
            out.finish_reason = _FINISH[ev.finish]
            out.stop_word = ev.stop_word or None
            out.usage = Usage(
                prompt_tokens=ev.n_prompt,
                cached_tokens=ev.n_cached,
                completion_tokens=ev.n_decoded,
                prompt_ms=ev.t_prompt_ms,
                generation_ms=ev.t_gen_ms,
                drafted_tokens=ev.n_drafted,
                accepted_tokens=ev.n_accepted,
            )
        return out

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.token_pieces([token])[0]
        return piece

    # ---- text utilities (any time after start) ----

    async def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        core = self._require()
        tokens: list[int] = await self._off_loop(
            len(text) <= INLINE_MAX,
            core.tokenize,
            core.post_tokenize,
            text,
            add_special,
            parse_special,
        )
        return tokens

    async def detokenize(self, tokens: list[int]) -> str:
        core = self._require()
        text: str = await self._off_loop(
            len(tokens) <= INLINE_MAX, core.detokenize, core.post_detokenize, _token_list(tokens)
        )
        return text

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        try:
            return list(self._require().token_pieces(_token_list(tokens)))
        except _core.InvalidRequest as e:
            raise _invalid(e) from None

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt for OpenAI-style ``messages`` (their content: text, or text parts)."""
        core = self._require()
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        encoded = _json.encode(messages)
        prompt: str = await self._off_loop(
            len(encoded) <= INLINE_MAX,
            core.apply_chat_template,
            core.post_template,
            encoded.decode(),
            add_generation_prompt,
        )
        return prompt

    async def apply_chat(self, inputs: dict[str, Any]) -> _core.ChatRender:
        """A chat with its tools and reasoning settings through the model's template: the
        prompt, the tool-call grammar, and what the answer's parser needs. ``inputs``: see
        ``model::apply_chat`` (csrc/model.h)."""
        core = self._require()
        encoded = _json.encode(inputs)
        render: _core.ChatRender = await self._off_loop(
            len(encoded) <= INLINE_MAX, core.apply_chat, core.post_chat, encoded.decode()
        )
        return render

    def chat_parser(self, render: object) -> _core.ChatParser:
        """A parser for one answer to a chat rendered by ``apply_chat`` (its ChatRender)."""
        if not isinstance(render, _core.ChatRender):
            raise TypeError("chat_parser takes a render of apply_chat")
        return _core.ChatParser(render)

    @property
    def media_marker(self) -> str | None:
        """What marks a media input's place in a text prompt; None without a projector."""
        core = self._require()
        return core.media_marker() or None

    def fim_tokens(self) -> tuple[int, int, int] | None:
        info = self._require().info
        ids = (info.fim_pre, info.fim_suf, info.fim_mid)
        return None if any(t < 0 for t in ids) else ids

    def stats(self) -> EngineStats:
        s = self._require().stats()
        n_ctx_slot = self.model_info.n_ctx_slot
        return EngineStats(
            n_slots=s.n_slots,
            n_busy=s.n_busy,
            n_queued=s.n_queued,
            kv_cells_used=s.kv_cells_used,
            kv_cells_total=s.kv_cells_total,
            n_prompt_tokens_total=s.n_prompt_tokens_total,
            t_prompt_ms_total=s.t_prompt_ms_total,
            n_tokens_predicted_total=s.n_tokens_predicted_total,
            t_predicted_ms_total=s.t_predicted_ms_total,
            n_tokens_drafted_total=s.n_tokens_drafted_total,
            n_tokens_drafted_accepted_total=s.n_tokens_drafted_accepted_total,
            n_decode_total=s.n_decode_total,
            n_decode_failed_total=s.n_decode_failed_total,
            n_requests_total=s.n_requests_total,
            n_media_inputs_total=s.n_media_inputs_total,
            n_media_cache_hits_total=s.n_media_cache_hits_total,
            n_media_encoded_total=s.n_media_encoded_total,
            t_media_encode_ms_total=s.t_media_encode_ms_total,
            n_media_cache_entries=s.n_media_cache_entries,
            n_media_decodes_total=s.n_media_decodes_total,
            slots=[
                SlotInfo(
                    id=x.id_slot,
                    state=x.state,
                    n_ctx=n_ctx_slot,
                    n_cached=x.n_cached,
                    n_prompt=x.n_prompt,
                    n_decoded=x.n_decoded,
                    n_drafted=x.n_drafted,
                    n_accepted=x.n_accepted,
                    draft_acceptance=round(x.draft_acceptance, 4),
                    request_id=x.tag or None,
                )
                for x in s.slots
            ],
        )

    def _model_info(self, core: _core.Engine) -> ModelInfo:
        i = core.info

        def text(token: int) -> str:
            return core.token_pieces([token])[0].decode("utf-8", "replace") if token >= 0 else ""

        return ModelInfo(
            path=i.path,
            description=i.description,
            architecture=i.architecture,
            n_params=i.n_params,
            size_bytes=i.size_bytes,
            n_vocab=i.n_vocab,
            n_ctx_train=i.n_ctx_train,
            n_embd=i.n_embd,
            n_ctx=i.n_ctx,
            n_ctx_slot=i.n_ctx_slot,
            chat_template=i.chat_template,
            chat_template_caps=dict(i.chat_template_caps),
            has_fim=min(i.fim_pre, i.fim_suf, i.fim_mid) >= 0,
            bos_token=text(i.bos),
            eos_token=text(i.eos),
            embeddings=i.embeddings,
            n_embd_tokens_max=i.n_embd_tokens_max,
            vision=i.vision,
            audio=i.audio,
        )


def _token_list(tokens: list[int], param: str = "tokens") -> list[int]:
    """Token ids that fit the native type; the range against the vocabulary is C++'s check."""
    for token in tokens:
        if not -(2**31) <= token < 2**31:
            raise InvalidRequestError(f"token id {token} is out of range", param=param)
    return tokens


def _submit_all(core: _core.Engine, batches: list[_core.Prepared]) -> None:
    """Queues each (O(1)); the engine's errors become this module's."""
    try:
        for prepared in batches:
            core.submit(prepared)
    except _core.QueueFull as e:
        raise QueueFullError(str(e)) from None
    except _core.EngineStopped as e:
        raise EngineStoppedError(str(e)) from None
