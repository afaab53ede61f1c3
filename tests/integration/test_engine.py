"""The engine on the tiny random-weight model: batching, prefix reuse, cancellation, stops,
sampling, grammars, embeddings and bad input."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import gguf
import msgspec
import pytest

from llamabox import _core
from llamabox.engine import Engine
from llamabox.types import (
    ContextLengthError,
    EngineConfig,
    GenerateRequest,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    SamplingParams,
)
from tests.fixtures import make_not_gguf, make_tiny_llama, make_tiny_mamba
from tests.integration.engine_helpers import collect, greedy, text_of, tokens_until_idle

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "Once upon a time",
    "In the beginning",
    "To be or not to be",
    "A long time ago",
    "It was a dark and stormy night",
    "Call me Ishmael",
]


async def test_greedy_output_same_alone_and_among_concurrent(tiny_engine: Engine) -> None:
    alone = [await text_of(tiny_engine, greedy(p, 24, ignore_eos=True)) for p in PROMPTS]
    together = await asyncio.gather(
        *(text_of(tiny_engine, greedy(p, 24, ignore_eos=True)) for p in PROMPTS)
    )
    assert list(together) == alone
    assert len(set(alone)) == len(alone), "different prompts should continue differently"


async def test_prefix_reuse_reports_cached_tokens(tiny_engine: Engine) -> None:
    prefix = " ".join(f"word{i}" for i in range(120))
    n_prefix = len(await tiny_engine.tokenize(prefix))
    assert n_prefix >= 200
    _, first = await collect(tiny_engine, greedy(prefix + " first question", 4))
    _, second = await collect(tiny_engine, greedy(prefix + " another question", 4))
    assert first.usage is not None and second.usage is not None
    assert second.usage.cached_tokens >= 200
    assert second.usage.cached_tokens >= n_prefix - 1


async def test_prefix_reuse_keeps_output_identical(tiny_engine: Engine) -> None:
    prompt = " ".join(f"item{i}" for i in range(60))
    cold = await text_of(
        tiny_engine,
        GenerateRequest(
            prompt=prompt,
            max_tokens=12,
            cache_prompt=False,
            sampling=SamplingParams(temperature=0, ignore_eos=True),
        ),
    )
    warm = await text_of(tiny_engine, greedy(prompt, 12, ignore_eos=True))
    warm2 = await text_of(tiny_engine, greedy(prompt, 12, ignore_eos=True))
    assert cold == warm == warm2


async def test_cancellation_frees_the_slot(tiny_engine: Engine) -> None:
    before = tiny_engine.stats().n_tokens_predicted_total
    stream = await tiny_engine.generate(greedy("Never ending", 400, ignore_eos=True))
    first = await stream.__anext__()
    assert first.finish_reason is None
    stream.cancel()
    assert await tokens_until_idle(tiny_engine, before) < 200


async def test_cancelling_the_consumer_task_cancels_the_request(tiny_engine: Engine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in await tiny_engine.generate(greedy("Keep going", 400, ignore_eos=True)):
            started.set()

    before = tiny_engine.stats().n_tokens_predicted_total
    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await tokens_until_idle(tiny_engine, before) < 200


async def test_stop_string_across_tokens_never_leaks(tiny_engine: Engine) -> None:
    req = greedy("Hello world", 24, ignore_eos=True)
    outs, _ = await collect(tiny_engine, req)
    tokens = [t for o in outs for t in o.token_ids]
    pieces = [p.decode("utf-8", "replace") for p in tiny_engine.token_pieces(tokens)]
    full = "".join(o.text for o in outs)
    # A stop string that starts inside one token's text and ends inside the next one's.
    k = next(
        i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    start = len("".join(pieces[:k])) + len(pieces[k]) - 1
    stop = full[start : start + 2]
    assert stop and full.find(stop) == start

    stop_req = GenerateRequest(
        prompt="Hello world",
        max_tokens=24,
        stop=[stop],
        sampling=SamplingParams(temperature=0, ignore_eos=True),
    )
    stopped_outs, last = await collect(tiny_engine, stop_req)
    deltas = [o.text for o in stopped_outs]
    assert "".join(deltas) == full[:start]
    assert last.finish_reason == "stop" and last.stop_word == stop
    assert all(stop not in d for d in deltas)


async def test_utf8_is_never_split(gpt2_engine: Engine) -> None:
    # Random weights over a byte-level vocabulary emit many partial multi-byte characters.
    for seed in range(4):
        req = GenerateRequest(
            prompt="Hello",
            max_tokens=64,
            sampling=SamplingParams(
                temperature=1.5, top_k=0, top_p=1, min_p=0, seed=seed, ignore_eos=True
            ),
        )
        outs, _ = await collect(gpt2_engine, req)
        tokens = [t for o in outs for t in o.token_ids]
        raw = b"".join(gpt2_engine.token_pieces(tokens))
        assert "".join(o.text for o in outs) == raw.decode("utf-8", "replace")


async def test_same_seed_same_output_different_seeds_differ(tiny_engine: Engine) -> None:
    def req(seed: int) -> GenerateRequest:
        return GenerateRequest(
            prompt="Once upon a time",
            max_tokens=24,
            sampling=SamplingParams(
                temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, ignore_eos=True
            ),
        )

    a1, a2, b = [await text_of(tiny_engine, req(s)) for s in (1, 1, 2)]
    assert a1 == a2
    assert a1 != b


async def test_top_k_shortcut_samples_like_the_full_chain(tiny_engine: Engine) -> None:
    # A neutral logit bias sends a request through llama.cpp's whole sampler chain; without it
    # the engine samples from the top-k tokens only. Same seed, same tokens.
    def req(bias: dict[int, float]) -> GenerateRequest:
        sampling = SamplingParams(
            temperature=1.0, top_k=40, top_p=0.9, min_p=0.02, seed=7, logit_bias=bias
        )
        return GenerateRequest(prompt="Once upon a time", max_tokens=32, sampling=sampling)

    assert await text_of(tiny_engine, req({})) == await text_of(tiny_engine, req({0: 0.0}))


async def test_grammar_constrains_output(tiny_engine: Engine) -> None:
    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    for prompt in PROMPTS[:3]:
        text = await text_of(tiny_engine, greedy(prompt, 16, grammar=grammar))
        word, num = text.split(" ")
        assert word in ("yes", "no") and len(num) == 2 and num.isdigit()


async def test_complete_grammar_ends_generation_even_with_ignore_eos(tiny_engine: Engine) -> None:
    # Once the grammar is complete only end-of-generation fits: it wins over ignore_eos
    # (forcing another token used to throw inside llama.cpp's grammar code).
    for temperature in (0.0, 1.0):
        req = greedy("x", 10, grammar='root ::= "yes"', ignore_eos=True)
        req.sampling.temperature = temperature
        outs, last = await collect(tiny_engine, req)
        assert "".join(o.text for o in outs) == "yes" and last.finish_reason == "stop"


async def test_json_schema_output_parses(tiny_engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    text = await text_of(tiny_engine, greedy("Answer:", 64, json_schema=json.dumps(schema)))
    value = json.loads(text)
    assert isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


async def test_invalid_grammar_is_rejected_at_submit(tiny_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="grammar"):
        await tiny_engine.generate(greedy("x", 4, grammar="root ::= ("))
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        await tiny_engine.generate(greedy("x", 4, json_schema="{not json"))


async def test_logprobs(tiny_engine: Engine) -> None:
    outs, _ = await collect(
        tiny_engine, greedy("Hello world", 6, logprobs=True, n_probs=3, ignore_eos=True)
    )
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    tokens = [t for o in outs for t in o.token_ids]
    assert [lp.token for lp in lps] == tokens
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0].token == lp.token  # greedy picks the most likely token
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert math.isclose(lp.top[0].logprob, lp.logprob)


async def test_max_tokens_and_usage(tiny_engine: Engine) -> None:
    outs, last = await collect(tiny_engine, greedy("Count", 5, ignore_eos=True))
    assert last.finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 5
    assert sum(len(o.token_ids) for o in outs) == 5
    assert last.usage.prompt_tokens == len(await tiny_engine.tokenize("Count"))


async def test_context_full_ends_with_length(tiny_engine: Engine) -> None:
    n_ctx_slot = tiny_engine.model_info.n_ctx_slot
    prompt = list(range(100, 100 + n_ctx_slot - 4))
    _, last = await collect(tiny_engine, greedy(prompt, None, ignore_eos=True))  # type: ignore[arg-type]
    assert last.finish_reason == "length"
    assert (
        last.usage is not None
        and last.usage.prompt_tokens + last.usage.completion_tokens <= n_ctx_slot
    )


async def test_prompt_longer_than_slot_context_is_rejected_and_engine_goes_on(
    tiny_engine: Engine,
) -> None:
    n_ctx_slot = tiny_engine.model_info.n_ctx_slot
    with pytest.raises(ContextLengthError) as err:
        await tiny_engine.generate(greedy(list(range(10, 10 + n_ctx_slot + 5)), 4))
    assert f"{n_ctx_slot + 5} tokens" in str(err.value) and str(n_ctx_slot) in str(err.value)
    assert await text_of(tiny_engine, greedy("Still alive", 4, ignore_eos=True))


async def test_bad_request_values(tiny_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError):
        await tiny_engine.generate(greedy([999_999], 4))
    with pytest.raises(InvalidRequestError):
        await tiny_engine.generate(greedy([], 4))


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"seed": 2**64 - 1}, "seed"),
        ({"top_k": 2**40}, "top_k"),
        ({"repeat_last_n": 2**31}, "repeat_last_n"),
        ({"frequency_penalty": 1e300}, "frequency_penalty"),
        ({"temperature": math.inf}, "temperature"),
        ({"logit_bias": {2**40: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 1e39}}, "logit_bias"),
    ],
)
async def test_values_beyond_the_native_types_are_400s(
    tiny_engine: Engine, sampling: dict[str, object], param: str
) -> None:
    """Values no native type holds (ranges are the wire types' to check): not pybind11's
    TypeError, nor an infinity handed to llama.cpp, but a 400 naming its field."""
    with pytest.raises(InvalidRequestError) as err:
        await tiny_engine.generate(GenerateRequest(prompt="x", sampling=SamplingParams(**sampling)))  # type: ignore[arg-type]
    assert err.value.param == param
    for request in (
        GenerateRequest(prompt="x", max_tokens=2**31),
        GenerateRequest(prompt=[1, 2**40]),
    ):
        with pytest.raises(InvalidRequestError):
            await tiny_engine.generate(request)
    for tokens in ([2**40], [-1]):
        with pytest.raises(InvalidRequestError):
            await tiny_engine.detokenize(tokens)
        with pytest.raises(InvalidRequestError):
            tiny_engine.token_pieces(tokens)
    with pytest.raises(InvalidRequestError):
        await tiny_engine.embed([[1, 2**40]])


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}, "nests groups"),
        ({"grammar": 'root ::= "a"{5,2}'}, "minimum is more than the maximum"),
        ({"grammar": "root ::= " + '"a"{0,2000} ' * 200}, "expands to more than"),
        ({"json_schema": '{"allOf": [{"$ref": "#/allOf/0"}]}'}, "leads back to itself"),
        ({"repeat_penalty": 1e-300}, "invalid sampling parameters"),
    ],
)
async def test_grammars_and_schemas_that_would_crash_are_refused(
    tiny_engine: Engine, sampling: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        await tiny_engine.generate(greedy("x", 4, **sampling))


@pytest.mark.parametrize(
    "sampling",
    [
        {"grammar": "root ::= <[99999999]>"},
        {"grammar": 'root ::= "a"', "logit_bias": {2: -math.inf}},
        {"logit_bias": dict.fromkeys(range(32000), -math.inf)},
        {"logit_bias": dict.fromkeys(range(32000), -math.inf), "temperature": 1.0},
    ],
)
async def test_no_token_left_to_sample_fails_the_request_as_bad_input(
    tiny_engine: Engine, sampling: dict[str, object]
) -> None:
    request = GenerateRequest(prompt="x", max_tokens=4, sampling=SamplingParams(**sampling))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="no token can be sampled"):
        await collect(tiny_engine, request)
    assert await text_of(tiny_engine, greedy("Still alive", 4, ignore_eos=True))


async def test_embeddings(tiny_engine: Engine) -> None:
    a, b, a2 = await tiny_engine.embed(["Hello world", "Something else entirely", "Hello world"])
    assert isinstance(a.embedding[0], float)
    assert math.isclose(sum(x * x for x in a.embedding), 1.0, rel_tol=1e-4)  # type: ignore[operator]
    # The same text in one batch at another place: the same vector up to float rounding.
    pairs = zip(a.embedding, a2.embedding, strict=True)
    assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in pairs)  # type: ignore[arg-type]
    assert a.embedding != b.embedding
    assert a.prompt_tokens == len(await tiny_engine.tokenize("Hello world"))


async def test_chat_template_fallback_and_errors(tiny_engine: Engine) -> None:
    text = await tiny_engine.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    )
    assert "Hi" in text  # ChatML fallback: the tiny model has no template
    with pytest.raises(InvalidRequestError):
        await tiny_engine.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])


async def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        await Engine(EngineConfig(model=str(tmp_path / "nope.gguf"))).start()
    bad = make_not_gguf(tmp_path / "bad.gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        await Engine(EngineConfig(model=str(bad))).start()


async def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="no-such-arch"):
        await Engine(EngineConfig(model=str(path))).start()


async def test_full_queue_is_refused(tiny_model_path: Path) -> None:
    async with Engine(
        EngineConfig(model=str(tiny_model_path), n_parallel=1, n_ctx=512, n_queue_max=1)
    ) as engine:
        streams = [await engine.generate(greedy("a", 200, ignore_eos=True))]
        await streams[0].__anext__()  # the first holds the only slot
        streams.append(await engine.generate(greedy("b", 200, ignore_eos=True)))  # waits
        with pytest.raises(QueueFullError):
            await engine.generate(greedy("c", 4))
        for s in streams:
            s.cancel()


async def test_full_shared_kv_cache_ends_the_youngest_request_first(tiny_model_path: Path) -> None:
    # A unified KV cache of 256 cells lets two sequences outgrow it together: llama_decode then
    # finds no room. Room is made by ending the younger request ("length", its text intact),
    # then the older one once it alone fills the cache; the engine serves the next request.
    config = EngineConfig(model=str(tiny_model_path), n_parallel=2, n_ctx=256, kv_unified=True)
    async with Engine(config) as engine:
        failed_before = engine.stats().n_decode_failed_total
        older = await engine.generate(greedy(list(range(10, 110)), 400, ignore_eos=True))
        first = await older.__anext__()
        younger = await engine.generate(greedy(list(range(200, 300)), 400, ignore_eos=True))
        outs_younger = [o async for o in younger]
        outs_older = [first] + [o async for o in older]
        for outs in (outs_older, outs_younger):
            assert outs[-1].finish_reason == "length"
            assert outs[-1].usage is not None
            assert outs[-1].usage.completion_tokens == sum(len(o.token_ids) for o in outs)
        n_older = sum(len(o.token_ids) for o in outs_older)
        n_younger = sum(len(o.token_ids) for o in outs_younger)
        assert n_younger < n_older and 100 + n_older <= 256
        assert engine.stats().n_decode_failed_total > failed_before
        _, last = await collect(engine, greedy("still serving", 8, ignore_eos=True))
        assert last.finish_reason == "length"
        assert engine.stats().n_busy == 0


async def test_dropped_stream_frees_its_slot(tiny_engine: Engine) -> None:
    before = tiny_engine.stats().n_tokens_predicted_total
    stream = await tiny_engine.generate(greedy("Forgotten", 400, ignore_eos=True))
    await stream.__anext__()
    del stream  # never read to the end, never cancelled: collected, and that cancels it
    assert await tokens_until_idle(tiny_engine, before) < 200


# ---- fixes: each of these failed before its fix ----


@pytest.fixture(scope="session")
def wide_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512-wide f16 rows: ggml's matmul kernels for one row and for several round differently
    (seen on AVX-512 and on AVX2 CPUs), as they do on real models."""
    path = tmp_path_factory.mktemp("models") / "tiny-wide.gguf"
    return make_tiny_llama(path, n_embd=512, n_head=8, n_head_kv=4, n_ff=1024)


async def test_same_seed_same_output_whatever_the_cache_holds(wide_model_path: Path) -> None:
    """A prompt's last token is decoded on its own whether or not the rest was cached, so its
    logits (and so the first sampled token) are the same bit for bit: cold (nothing cached) and
    warm (the whole prompt cached). Before, a warm request decoded that token alone and a cold
    one within its prompt's batch: other rounding, and with sampling another text."""
    config = EngineConfig(model=str(wide_model_path), n_ctx=1024, seed=42, n_threads=2)
    prompt = "I believe the meaning of life is"
    async with Engine(config) as engine:

        async def run(cache_prompt: bool, **sampling: object) -> tuple[str, list[object]]:
            request = GenerateRequest(
                prompt=prompt,
                max_tokens=8,
                cache_prompt=cache_prompt,
                sampling=SamplingParams(logprobs=True, n_probs=5, **sampling),  # type: ignore[arg-type]
            )
            outs, _ = await collect(engine, request)
            lps = [lp for o in outs for lp in o.logprobs or []]
            return "".join(o.text for o in outs), [
                (lp.token, lp.logprob, [t.logprob for t in lp.top]) for lp in lps
            ]

        for sampling in ({}, {"temperature": 0.0}, {"temperature": 1.5, "top_k": 0}):
            cold = await run(False, **sampling)
            warm = await run(True, **sampling)
            warm_again = await run(True, **sampling)
            assert cold == warm == warm_again, sampling


async def test_log_sink_outlives_every_engine(tiny_model_path: Path, tmp_path: Path) -> None:
    """llama.cpp's log callback is process-wide: it must never point at a freed engine's sink,
    after a failed load or once one of two engines is gone, and each load failure still
    carries llama.cpp's own reason."""
    from llamabox._core import testing

    alien = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(alien), "no-such-arch")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = EngineConfig(model=str(tiny_model_path), n_ctx=512, n_threads=2)
    async with Engine(config) as first:
        assert testing.log_sink_installed()
        with pytest.raises(ModelLoadError, match="no-such-arch"):
            await Engine(EngineConfig(model=str(alien))).start()
        assert testing.log_sink_installed()
        second = Engine(msgspec.structs.replace(config, verbose=True))
        await second.start()
        assert await text_of(first, greedy("one", 4, ignore_eos=True))
    assert testing.log_sink_installed()  # `first` is gone, `second` lives
    with pytest.raises(ModelLoadError, match="no-such-arch"):
        await Engine(EngineConfig(model=str(alien))).start()
    assert await text_of(second, greedy("two", 4, ignore_eos=True))
    await second.stop()
    assert testing.log_sink_installed()


async def test_builtin_chat_template_names(tiny_model_path: Path) -> None:
    """`--chat-template llama3` names llama.cpp's built-in template, not Jinja source."""
    messages = [{"role": "user", "content": "Hi"}]
    expected = {
        "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "gemma": "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    }
    for name, prompt in expected.items():
        config = EngineConfig(model=str(tiny_model_path), n_ctx=512, chat_template=name)
        async with Engine(config) as engine:
            assert await engine.apply_chat_template(messages) == prompt, name
            assert engine.model_info.chat_template == name
    with pytest.raises(ModelLoadError, match="neither a built-in template name"):
        await Engine(EngineConfig(model=str(tiny_model_path), chat_template="llama-9")).start()


async def test_embeddings_leave_generation_caches_alone(tiny_model_path: Path) -> None:
    """Embeddings run in a context of their own: a conversation's cached prefix survives."""
    config = EngineConfig(
        model=str(tiny_model_path), n_parallel=1, n_ctx=1024, embeddings=True, n_threads=2
    )
    prompt = " ".join(f"word{i}" for i in range(100))
    async with Engine(config) as engine:
        n_prompt = len(await engine.tokenize(prompt))
        _, first = await collect(engine, greedy(prompt, 4))
        await engine.embed(["something else entirely", "and more"])
        _, second = await collect(engine, greedy(prompt, 4))
        assert first.usage is not None and second.usage is not None
        assert second.usage.cached_tokens == n_prompt - 1  # all but the last prompt token
        assert engine.stats().slots[0].n_cached >= n_prompt


async def test_failed_decode_spares_the_generating_bystander(tiny_model_path: Path) -> None:
    """A prompt that finds no room in a full KV cache fails alone: the shed-prefill retries run
    (counted), and the request that was generating alongside finishes, with the same text as
    when it runs alone."""
    config = EngineConfig(
        model=str(tiny_model_path), n_parallel=2, n_ctx=256, kv_unified=True, n_threads=2
    )
    async with Engine(config) as engine:
        alone = await text_of(engine, greedy("A bystander", 100, ignore_eos=True))
        failed_before = engine.stats().n_decode_failed_total
        bystander = await engine.generate(greedy("A bystander", 100, ignore_eos=True))
        outs = [await bystander.__anext__() for _ in range(12)]  # it holds ~15 cells by now
        # 250 prompt tokens fit the slot context (256) but not the cells the bystander leaves
        with pytest.raises(GenerationError, match="no room in the KV cache"):
            await collect(engine, greedy(list(range(100, 350)), 4))
        outs += [o async for o in bystander]
        assert outs[-1].finish_reason == "length"
        assert "".join(o.text for o in outs) == alone
        assert engine.stats().n_decode_failed_total > failed_before
        assert await text_of(engine, greedy("still serving", 8, ignore_eos=True))


async def test_memory_that_cannot_drop_a_tail_drops_the_whole_prefix(tmp_path: Path) -> None:
    """A recurrent model's memory refuses to remove the tail of a sequence
    (llama_memory_seq_rm returns false): the slot then forgets its whole cached prefix and
    prefills again, with the same output as a cold request, never a stale state."""
    path = make_tiny_mamba(tmp_path / "tiny-mamba.gguf")
    config = EngineConfig(model=str(path), n_parallel=1, n_ctx=1024, n_threads=2)
    async with Engine(config) as engine:
        for prompt in ("The quick brown fox jumps", "The quick brown fox sleeps"):
            cold = GenerateRequest(
                prompt=prompt,
                max_tokens=8,
                cache_prompt=False,
                sampling=SamplingParams(temperature=0, ignore_eos=True, logprobs=True),
            )
            cold_outs, _ = await collect(engine, cold)
            warm_outs, warm = await collect(engine, greedy(prompt, 8, ignore_eos=True))
            assert warm.usage is not None and warm.usage.cached_tokens == 0
            assert [t for o in warm_outs for t in o.token_ids] == [
                t for o in cold_outs for t in o.token_ids
            ]
        n_prompt = len(await engine.tokenize("The quick brown fox sleeps"))
        assert engine.stats().slots[0].n_cached == n_prompt + 8 - 1


async def test_load_progress_and_cancel(tiny_model_path: Path) -> None:
    """The load's progress is readable while it runs and None after; a cancelled load fails."""
    engine = Engine(EngineConfig(model=str(tiny_model_path), n_ctx=256))
    assert engine.load_progress is None
    task = asyncio.create_task(engine.start())
    seen: list[float] = []
    while not task.done():
        if (p := engine.load_progress) is not None:
            seen.append(p)
        await asyncio.sleep(0)
    await task
    assert engine.load_progress is None
    assert all(0.0 <= p <= 1.0 for p in seen) and seen == sorted(seen)
    await engine.stop()

    params = _core.EngineParams()
    params.model_path = str(tiny_model_path)
    params.progress = progress = _core.LoadProgress()
    progress.cancel()
    with pytest.raises(_core.LoadError, match="cancelled"):
        _core.Engine(params)
