"""A replaying stand-in for ``llamabox.engine.Engine`` and helpers to drive the ASGI app.

The fake implements ``EngineLike`` and knows nothing about text generation: each stream replays
a script (a list of ``GenerationOutput``, possibly with an exception in it) exactly as given.
It applies no stop strings, no token limits, no context or range checks, no normalization and
no chat template: whatever a unit test sees on the wire was put together by the serving layer
from the script. What the engine itself does is tested against the real one (tests/integration).

What a test can set or read:

* ``engine.outputs``: the default script of every stream (``reply("Hello world!")``);
  ``engine.next_outputs``: scripts for the next streams, one per stream, in order.
* ``engine.fail_next(method, exc, after=0)``: the next call (after ``after`` that succeed) of
  ``generate_choices``, ``embed``, ``tokenize``, ``detokenize`` or ``apply_chat_template``
  raises ``exc``. A script may hold an exception too: raised mid-stream (``failing(...)``).
* ``engine.hold(n)``: ``n`` busy streams, as if other clients held slots; ``cancel()`` frees.
* ``engine.pieces``: token id -> bytes for ``token_pieces`` and ``detokenize`` where the
  character tokenizer's own are not wanted (BOS is ``<s>``).
* ``engine.calls``: every ``(GenerateRequest, n)`` given to ``generate_choices``;
  ``engine.templated``: every messages list given to ``apply_chat_template``;
  ``engine.chat_inputs``: every ``apply_chat`` inputs; with tools, answers are read by
  ``FakeParser`` (``CALL name {json}`` lines are calls);
  ``engine.embed_inputs``: every input list given to ``embed``; ``engine.streams``: all streams.
* ``engine.embeddings``: the results ``embed`` answers (default: one fixed vector per input).
* ``token_delay`` (seconds before each output), ``load_delay`` / ``load_error`` (``start``).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx

from llamabox.api.app import LlamaboxApp, create_app
from llamabox.config import ServerConfig
from llamabox.types import (
    EmbeddingResult,
    EngineConfig,
    EngineStats,
    FinishReason,
    GenerateRequest,
    GenerationOutput,
    InvalidRequestError,
    ModelInfo,
    ModelLoadError,
    SlotInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)

BOS, EOS, FIM_PRE, FIM_SUF, FIM_MID = 1, 2, 4, 5, 6
OFFSET = 16  # the fake tokenizer: token id of a character = its code point + OFFSET
N_CTX_SLOT = 256
N_EMBD_TOKENS_MAX = 512
PROMPT_TOKENS = 7  # what the default script reports, whatever the prompt
PROMPT_MS, GENERATION_MS = 2.0, 4.0
TEMPLATE_MARK = "<chat>"

Script = list[GenerationOutput | BaseException]


def tok(text: str) -> list[int]:
    """The fake tokenizer's ids of ``text`` (no BOS)."""
    return [ord(c) + OFFSET for c in text]


def rendered(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """What the fake's ``apply_chat_template`` answers: a marker and the messages as JSON."""
    return TEMPLATE_MARK + json.dumps(messages) + ("<gen>" if add_generation_prompt else "")


def logprob(ch: str, n_top: int = 0) -> TokenLogprob:
    """A made-up log-probability entry for one character: -0.5, alternatives a, b, ... at -1,
    -2, ..."""
    top = [
        TopLogprob(ord(c) + OFFSET, c.encode(), -1.0 - i) for i, c in enumerate("abcdef"[:n_top])
    ]
    return TokenLogprob(ord(ch) + OFFSET, ch.encode(), -0.5, top)


def reply(
    text: str = "Hello world!",
    finish: FinishReason = "stop",
    *,
    stop_word: str | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    cached_tokens: int = 0,
    completion_tokens: int | None = None,
    n_top: int | None = None,
    drafted: int = 0,
    accepted: int = 0,
) -> Script:
    """``text`` one character (one token, id = code point + OFFSET) per output, then the last
    output with ``finish``, ``stop_word`` and the usage (completion tokens: one per character
    unless given). With ``n_top``, each character has a log-probability entry."""
    outputs: Script = []
    for ch in text:
        out = GenerationOutput(text=ch, token_ids=[ord(ch) + OFFSET])
        if n_top is not None:
            out.logprobs = [logprob(ch, n_top)]
        outputs.append(out)
    usage = Usage(
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        completion_tokens=len(text) if completion_tokens is None else completion_tokens,
        prompt_ms=PROMPT_MS,
        generation_ms=GENERATION_MS,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
    )
    outputs.append(GenerationOutput(finish_reason=finish, stop_word=stop_word, usage=usage))
    return outputs


def failing(text: str, error: BaseException) -> Script:
    """``text`` one character per output, then ``error`` raised instead of a last output."""
    return [*reply(text)[:-1], error]


class FakeRender(NamedTuple):
    """A render of the fake template: plain content, no tool-call grammar."""

    prompt: str
    grammar: str = ""
    grammar_lazy: bool = False
    grammar_triggers: list[tuple[int, str]] = []
    preserved_tokens: list[str] = []
    additional_stops: list[str] = []
    generation_prompt: str = ""
    parses: bool = False


class FakeCall(NamedTuple):
    id: str
    name: str
    arguments: str


class FakeDelta(NamedTuple):
    reasoning: str = ""
    content: str = ""
    tool_index: int = -1
    tool_id: str = ""
    tool_name: str = ""
    tool_arguments: str = ""


class FakeMessage(NamedTuple):
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[FakeCall] = []


class FakeParser:
    """The fake template's answer format, with tools: ``<think>R</think>`` opens an answer with
    reasoning R, and each line ``CALL name {json}`` is a call; the rest is content. Deltas come
    at the end, in one go."""

    def __init__(self) -> None:
        self.text = ""
        self.message = FakeMessage()

    def push(self, text: str, is_final: bool = False) -> list[FakeDelta]:
        self.text += text
        if not is_final:
            return []
        body, reasoning = self.text, ""
        if body.startswith("<think>") and "</think>" in body:
            reasoning, body = body[7:].split("</think>", 1)
        calls, lines = [], []
        for line in body.split("\n"):
            if line.startswith("CALL "):
                name, _, arguments = line[5:].partition(" ")
                calls.append(FakeCall(f"id{len(calls):07d}", name, arguments or "{}"))
            else:
                lines.append(line)
        self.message = FakeMessage("\n".join(lines), reasoning, calls)
        out = [FakeDelta(reasoning=reasoning)] if reasoning else []
        out += [FakeDelta(content=self.message.content)] if self.message.content else []
        out += [FakeDelta(tool_index=i, tool_id=c.id, tool_name=c.name, tool_arguments=c.arguments)
                for i, c in enumerate(calls)]  # fmt: skip
        return out


class FakeStream:
    """Replays its script; ``cancel()`` before the end marks it cancelled and frees its slot."""

    def __init__(self, engine: FakeEngine, request: GenerateRequest, script: Script) -> None:
        self.engine = engine
        self.request = request
        self.script = list(script)
        self.cancelled = False  # cancelled before the script ended
        self.finished = False
        self.n_read = 0

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self.cancelled or self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(self.engine.token_delay)
        if self.cancelled:
            raise StopAsyncIteration
        if not self.script:
            self._free()
            raise StopAsyncIteration
        item = self.script.pop(0)
        self.n_read += 1
        if isinstance(item, BaseException):
            self._free()
            raise item
        if item.finish_reason is not None or not self.script:
            self._free()
        return item

    def _free(self) -> None:
        self.finished = True
        if self in self.engine.active:
            self.engine.active.remove(self)

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled = True
            self._free()

    async def aclose(self) -> None:
        self.cancel()

    def keep_outputs(self) -> None:
        self.kept_apart = True  # a script's outputs are apart anyway


class Call(NamedTuple):
    request: GenerateRequest
    n: int


_FAILABLE = ("generate_choices", "embed", "tokenize", "detokenize", "apply_chat_template")


class FakeEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        outputs: Script | None = None,
        has_fim: bool = True,
        load_delay: float = 0.0,
        load_error: str | None = None,
    ) -> None:
        self.config = config or EngineConfig(model="/models/fake-model.gguf", n_parallel=4)
        self.outputs: Script = reply() if outputs is None else outputs
        self.next_outputs: list[Script] = []
        self.has_fim = has_fim
        self.load_delay = load_delay
        self.load_error = load_error
        self.token_delay = 0.0
        self.loaded = False
        self.starting = False
        self.progress = 0.5  # what load_progress reports while start() waits
        self.stopped = False
        self.fail_reason: str | None = None  # what `failure` says (a lost RPC server, say)
        self.slot_actions: list[tuple[int, str, str]] = []
        self.calls: list[Call] = []
        self.templated: list[list[dict[str, Any]]] = []
        self.chat_inputs: list[dict[str, Any]] = []  # every apply_chat's inputs
        self.embed_inputs: list[list[Any]] = []
        self.embeddings: list[EmbeddingResult] | None = None
        self.pieces: dict[int, bytes] = {BOS: b"<s>", EOS: b"</s>"}
        self.streams: list[FakeStream] = []
        self.active: list[FakeStream] = []
        self._failures: dict[str, list[BaseException | None]] = {name: [] for name in _FAILABLE}

    # ---- what a test scripts and reads ----

    def fail_next(self, method: str, error: BaseException, *, after: int = 0) -> None:
        """The next call of ``method`` (after ``after`` more that succeed) raises ``error``.
        Queued: each call takes one entry. A failed call is not recorded."""
        self._failures[method] += [None] * after + [error]

    def _maybe_fail(self, method: str) -> None:
        if self._failures[method]:
            error = self._failures[method].pop(0)
            if error is not None:
                raise error

    @property
    def requests(self) -> list[GenerateRequest]:
        return [call.request for call in self.calls]

    def hold(self, n: int, request_id: str | None = None) -> list[FakeStream]:
        """``n`` streams busy until cancelled, as if other clients had taken ``n`` slots (not
        recorded in ``calls``; never read)."""
        request = GenerateRequest(prompt="held", request_id=request_id)
        streams = [FakeStream(self, request, []) for _ in range(n)]
        self.active += streams
        return streams

    # ---- EngineLike ----

    @property
    def failure(self) -> str | None:
        return self.fail_reason

    @property
    def is_loaded(self) -> bool:
        return self.loaded

    @property
    def load_progress(self) -> float | None:
        return self.progress if self.starting else None

    async def start(self) -> None:
        self.starting = True
        try:
            await asyncio.sleep(self.load_delay)
        finally:
            self.starting = False
        if self.load_error:
            raise ModelLoadError(self.load_error)
        self.loaded = True

    async def stop(self) -> None:
        self.stopped = True
        self.loaded = False
        for stream in list(self.active):
            stream.cancel()

    @property
    def media_marker(self) -> str | None:
        return None  # no projector

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(
            path=self.config.model,
            description="llama 1M Q4_K - Medium",
            architecture="llama",
            n_params=1_000_000,
            size_bytes=123_456,
            n_vocab=65536,
            n_ctx_train=2048,
            n_embd=4,
            n_ctx=N_CTX_SLOT * self.config.n_parallel,
            n_ctx_slot=N_CTX_SLOT,
            chat_template="{{ fake }}",
            has_fim=self.has_fim,
            bos_token="<s>",
            eos_token="</s>",
            embeddings=self.config.embeddings,
            n_embd_tokens_max=N_EMBD_TOKENS_MAX,
        )

    async def generate_choices(self, request: GenerateRequest, n: int) -> list[FakeStream]:
        self._maybe_fail("generate_choices")
        self.calls.append(Call(request, n))
        streams = []
        for _ in range(n):
            script = self.next_outputs.pop(0) if self.next_outputs else self.outputs
            copied = [x if isinstance(x, BaseException) else copy.deepcopy(x) for x in script]
            streams.append(FakeStream(self, request, copied))
        self.streams += streams
        self.active += streams
        return streams

    async def generate(self, request: GenerateRequest) -> FakeStream:
        [stream] = await self.generate_choices(request, 1)
        return stream

    async def embed(self, inputs: Sequence[str] | Sequence[list[int]]) -> list[EmbeddingResult]:
        self._maybe_fail("embed")
        self.embed_inputs.append(list(inputs))
        if self.embeddings is not None:
            return copy.deepcopy(self.embeddings)
        return [EmbeddingResult([float(i), 0.5, -0.25, 2.0], len(x)) for i, x in enumerate(inputs)]

    async def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        self._maybe_fail("tokenize")
        return [BOS, *tok(text)] if add_special else tok(text)

    def _piece(self, token: int) -> bytes:
        if token in self.pieces:
            return self.pieces[token]
        if token < OFFSET:
            return b""
        return chr(token - OFFSET).encode("utf-8", "surrogatepass")

    async def detokenize(self, tokens: list[int]) -> str:
        self._maybe_fail("detokenize")
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        return [self._piece(t) for t in tokens]

    async def slot_action(self, id_slot: int, action: str, path: str = "") -> dict[str, Any]:
        self.slot_actions.append((id_slot, action, path))
        if not 0 <= id_slot < self.config.n_parallel:
            raise InvalidRequestError(f"no slot {id_slot}")
        return {
            "save": {"n_saved": 5, "n_written": 1000, "ms": 1.5},
            "restore": {"n_restored": 5, "n_read": 1000, "ms": 2.5},
            "erase": {"n_erased": 5},
        }[action]

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        self._maybe_fail("apply_chat_template")
        self.templated.append(copy.deepcopy(messages))
        return rendered(messages, add_generation_prompt)

    async def apply_chat(self, inputs: dict[str, Any]) -> FakeRender:
        self._maybe_fail("apply_chat_template")
        self.templated.append(copy.deepcopy(inputs["messages"]))
        self.chat_inputs.append(copy.deepcopy(inputs))
        prompt = rendered(inputs["messages"], inputs["add_generation_prompt"])
        return FakeRender(prompt=prompt, parses=bool(inputs.get("tools")))

    def chat_parser(self, render: Any) -> FakeParser:
        return FakeParser()

    def fim_tokens(self) -> tuple[int, int, int] | None:
        return (FIM_PRE, FIM_SUF, FIM_MID) if self.has_fim else None

    def stats(self) -> EngineStats:
        n_slots = self.config.n_parallel
        busy = min(len(self.active), n_slots)
        return EngineStats(
            n_slots=n_slots,
            n_busy=busy,
            n_queued=max(len(self.active) - n_slots, 0),
            kv_cells_used=10,
            kv_cells_total=40,
            n_prompt_tokens_total=100,
            t_prompt_ms_total=50.0,
            n_tokens_predicted_total=30,
            t_predicted_ms_total=300.0,
            n_tokens_drafted_total=6,
            n_tokens_drafted_accepted_total=4,
            n_decode_total=31,
            n_decode_failed_total=1,
            n_requests_total=len(self.calls),
            slots=[
                SlotInfo(
                    id=i,
                    state=1 if i < busy else 0,
                    n_ctx=N_CTX_SLOT,
                    n_cached=3 * i,
                    n_prompt=0,
                    n_decoded=0,
                    request_id=self.active[i].request.request_id if i < busy else None,
                )
                for i in range(n_slots)
            ],
        )


def make_app(
    engine: FakeEngine | None = None, *, loaded: bool = True, **server: Any
) -> tuple[LlamaboxApp, FakeEngine]:
    """The app over a fake engine (already loaded unless ``loaded=False``)."""
    engine = engine or FakeEngine()
    engine.loaded = loaded
    config = ServerConfig(engine=engine.config, **server)
    return create_app(config, engine), engine


@asynccontextmanager
async def client(app: LlamaboxApp, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", **kwargs) as c:
        yield c


def sse_events(body: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    assert body.endswith("\n\n"), body[-50:]
    events = body[:-2].split("\n\n")
    out = []
    for event in events:
        assert event.startswith("data: "), event
        assert "\n" not in event, event
        out.append(event[len("data: ") :])
    return out


def ndjson(text: str) -> list[dict[str, Any]]:
    """The objects of an NDJSON body, one a line, each line ended."""
    assert text.endswith("\n"), text[-50:]
    return [json.loads(line) for line in text[:-1].split("\n")]
