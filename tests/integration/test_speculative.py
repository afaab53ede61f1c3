"""Speculative decoding: drafts change the speed, never the output.

On the tiny f16 fixture greedy output with any drafting type must be token-for-token what plain
decoding gives, alone and with several slots busy; with sampling, the draft is verified by
sampling each position in turn (llama.cpp's rule), which keeps the target's distribution. The
model drafting for itself accepts every draft.

A batch row's logits round a
little differently from a lone row's, so logprobs agree to 1e-2 and sampled text is compared
as a distribution.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llamabox import _core
from llamabox.engine import Engine
from llamabox.types import (
    EngineConfig,
    GenerateRequest,
    GenerationOutput,
    InvalidRequestError,
    ModelLoadError,
    NgramMapConfig,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeOverride,
)
from tests.conftest import _started, _stopped
from tests.fixtures import VOCAB_GPT2, make_tiny_llama, make_tiny_mamba

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

# Small n-grams: the tiny model's text repeats often enough for every type to find drafts.
NGRAM = NgramMapConfig(size_n=2, size_m=8, min_hits=1)
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
PROMPTS = (
    "Hello world, this is a test of the",
    "one two three four one two three four one two",
    "abc abc abc abc",
    "The quick brown fox jumps over the lazy dog. The quick brown",
)


def spec_config(**kw: object) -> SpeculativeConfig:
    base: dict[str, object] = {
        "ngram_simple": NGRAM, "ngram_map_k": NGRAM, "ngram_map_k4v": NGRAM,
        "ngram_mod_n_match": 4, "ngram_mod_n_min": 1, "ngram_mod_n_max": 8,
        "adaptive": False,  # verify every draft: the tests are about correctness
    }  # fmt: skip
    base.update(kw)
    return SpeculativeConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def repeating_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings: the model mostly repeats itself, so n-gram drafts get accepted."""
    return make_tiny_llama(tmp_path_factory.mktemp("spec") / "tied.gguf", tie_embeddings=True)


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("spec") / "varied.gguf")


async def engine_for(model: Path, spec: SpeculativeConfig, **kw: object) -> Engine:
    config: dict[str, object] = {"model": str(model), "n_parallel": 4, "n_ctx": 4 * 512,
                                 "n_threads": 2, "speculative": spec}  # fmt: skip
    config.update(kw)
    return await _started(EngineConfig(**config))  # type: ignore[arg-type]


async def run(engine: Engine, request: GenerateRequest) -> tuple[list[int], GenerationOutput]:
    outs = [o async for o in await engine.generate(request)]
    return [t for o in outs for t in o.token_ids], outs[-1]


def greedy(prompt: str, n: int = 64, **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0),
                           **kw)  # type: ignore[arg-type]  # fmt: skip


async def all_prompts(
    engine: Engine, make: object = greedy
) -> list[tuple[list[int], GenerationOutput]]:
    return list(await asyncio.gather(*(run(engine, make(p)) for p in PROMPTS)))  # type: ignore[operator]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plain_repeating(repeating_model: Path) -> AsyncIterator[Engine]:
    engine = await engine_for(repeating_model, SpeculativeConfig())
    yield engine
    await _stopped(engine)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def self_drafting(varied_model: Path) -> AsyncIterator[Engine]:
    engine = await engine_for(varied_model, spec_config(draft_model=str(varied_model), p_min=0.0))
    yield engine
    await _stopped(engine)


@pytest.mark.parametrize("kind", NGRAM_TYPES)
async def test_ngram_greedy_is_plain_decoding(
    kind: str, repeating_model: Path, plain_repeating: Engine
) -> None:
    expected = await all_prompts(plain_repeating)
    engine = await engine_for(repeating_model, spec_config(types=[kind]))
    try:
        got = await all_prompts(engine)  # four slots busy at once
        alone = await run(engine, greedy(PROMPTS[1]))
        stats = engine.stats()
    finally:
        await _stopped(engine)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert alone[0] == expected[1][0]
    drafted = sum(out.usage.drafted_tokens for _, out in got)
    assert drafted > 0, f"{kind} never drafted"
    assert stats.n_tokens_drafted_total == drafted + alone[1].usage.drafted_tokens
    for _, out in got:
        assert out.usage.accepted_tokens <= out.usage.drafted_tokens


async def test_draft_model_greedy_is_plain_and_accepts_everything(
    varied_model: Path, self_drafting: Engine
) -> None:
    plain = await engine_for(varied_model, SpeculativeConfig())
    try:
        expected = await all_prompts(plain)
    finally:
        await _stopped(plain)
    got = await all_prompts(self_drafting)
    assert [t for t, _ in got] == [t for t, _ in expected]
    drafted = sum(out.usage.drafted_tokens for _, out in got)
    accepted = sum(out.usage.accepted_tokens for _, out in got)
    assert drafted > 100
    assert accepted >= 0.95 * drafted  # the model agrees with itself


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32,
             8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12,
             15: 37.70}  # fmt: skip


def chi2_two_sample(a: Counter[int], b: Counter[int]) -> tuple[float, int]:
    """Pearson's two-sample statistic over the categories, rare ones pooled; (chi2, df)."""
    n_a, n_b = sum(a.values()), sum(b.values())
    cats = [c for c in set(a) | set(b) if a[c] + b[c] >= 10]
    rest = (n_a - sum(a[c] for c in cats), n_b - sum(b[c] for c in cats))
    rows = [(a[c], b[c]) for c in cats] + ([rest] if sum(rest) > 0 else [])
    chi2 = 0.0
    for x, y in rows:
        total = x + y
        for observed, n in ((x, n_a), (y, n_b)):
            expected = total * n / (n_a + n_b)
            chi2 += (observed - expected) ** 2 / expected
    return chi2, max(1, len(rows) - 1)


async def test_sampling_keeps_the_target_distribution(
    varied_model: Path, self_drafting: Engine
) -> None:
    """Verification samples each position with the request's own sampler and keeps the draft
    only while it matches (llama.cpp's rule): the tokens come from the target's distribution.
    Over fixed seeds, the 2nd and 3rd tokens' frequencies with drafts and without agree (a
    rule that trusted the draft would collapse them onto the draft model's argmax)."""

    def sampled(seed: int) -> GenerateRequest:
        sp = SamplingParams(temperature=1.5, top_k=4, top_p=1.0, min_p=0.0, seed=seed)
        return GenerateRequest(prompt=PROMPTS[0], max_tokens=3, sampling=sp)

    seeds = range(300)
    plain = await engine_for(varied_model, SpeculativeConfig())
    try:
        expected = [(await run(plain, sampled(s)))[0] for s in seeds]
    finally:
        await _stopped(plain)
    got_runs = [await run(self_drafting, sampled(s)) for s in seeds]
    got = [t for t, _ in got_runs]
    assert sum(out.usage.drafted_tokens for _, out in got_runs) > 100
    for pos in (1, 2):
        a, b = Counter(t[pos] for t in got), Counter(t[pos] for t in expected)
        assert len(b) >= 3  # the target really spreads its mass
        chi2, df = chi2_two_sample(a, b)
        assert chi2 < CHI2_CRIT[min(df, 15)], (pos, a.most_common(6), b.most_common(6))


async def test_stops_inside_an_accepted_run(varied_model: Path, self_drafting: Engine) -> None:
    plain = await engine_for(varied_model, SpeculativeConfig())
    try:
        full, _ = await run(plain, greedy(PROMPTS[0], 40))
        outs = [o async for o in await plain.generate(greedy(PROMPTS[0], 40))]
        full_text = "".join(o.text for o in outs)
        few, _ = await run(plain, greedy(PROMPTS[0], 5))
    finally:
        await _stopped(plain)
    # max_tokens in the middle of a 16-token draft
    got, out = await run(self_drafting, greedy(PROMPTS[0], 5))
    assert got == few and out.finish_reason == "length" and out.usage.completion_tokens == 5
    # a stop string in the middle of an accepted run: the text ends just before it
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    assert stop.strip() and full_text.count(stop) == 1
    outs = [o async for o in await self_drafting.generate(greedy(PROMPTS[0], 40, stop=[stop]))]
    assert "".join(o.text for o in outs) == full_text[: full_text.index(stop)]
    assert outs[-1].finish_reason == "stop"
    assert full[:5] == few


async def test_logprobs_grammar_and_n_choices(varied_model: Path, self_drafting: Engine) -> None:
    grammar = 'root ::= [a-z ]+ "."'

    def request(**kw: object) -> GenerateRequest:
        sp = SamplingParams(temperature=0.0, logprobs=True, n_probs=3, **kw)  # type: ignore[arg-type]
        return GenerateRequest(prompt=PROMPTS[2], max_tokens=24, sampling=sp)

    async def outputs(engine: Engine, req: GenerateRequest, n: int) -> list[list[GenerationOutput]]:
        streams = await engine.generate_choices(req, n)
        out = []
        for stream in streams:
            out.append([o async for o in stream])
        return out

    plain = await engine_for(varied_model, SpeculativeConfig())
    try:
        expected = await outputs(plain, request(), 3)
        expected_g = await outputs(plain, request(grammar=grammar), 1)
    finally:
        await _stopped(plain)
    got = await outputs(self_drafting, request(), 3)
    got_g = await outputs(self_drafting, request(grammar=grammar), 1)
    for exp, act in zip(expected + expected_g, got + got_g, strict=True):
        exp_lp = [lp for o in exp for lp in o.logprobs or []]
        act_lp = [lp for o in act for lp in o.logprobs or []]
        assert [lp.token for lp in act_lp] == [lp.token for lp in exp_lp]
        # a batch row's logits round a little differently from a lone row's
        assert [lp.logprob for lp in act_lp] == pytest.approx(
            [lp.logprob for lp in exp_lp], abs=1e-2
        )
        assert [lp.top[0].token for lp in act_lp] == [lp.top[0].token for lp in exp_lp]
    assert sum(o.usage.drafted_tokens for c in got for o in c if o.usage) > 0


async def test_prefix_reuse_and_cancel_keep_the_draft_kv_right(
    varied_model: Path, self_drafting: Engine
) -> None:
    first, _ = await run(self_drafting, greedy(PROMPTS[3], 32))
    again, out = await run(self_drafting, greedy(PROMPTS[3], 32))
    assert again == first and out.usage.cached_tokens > 0
    # a longer prompt sharing the prefix: the draft KV is trimmed and caught up, not stale
    longer = PROMPTS[3] + " jumps"
    plain = await engine_for(varied_model, SpeculativeConfig())
    try:
        expected, _ = await run(plain, greedy(longer, 32))
    finally:
        await _stopped(plain)
    got, _ = await run(self_drafting, greedy(longer, 32))
    assert got == expected
    # cancel mid-generation: the slot is freed, the next request is still right
    stream = await self_drafting.generate(greedy(PROMPTS[0], 400))
    async for _ in stream:
        break
    stream.cancel()
    async for _ in stream:
        pass
    got, _ = await run(self_drafting, greedy(longer, 32))
    assert got == expected


async def test_request_overrides(repeating_model: Path, self_drafting: Engine) -> None:
    off = SpeculativeOverride(type="none")
    _, out = await run(self_drafting, greedy(PROMPTS[0], 32, speculative=off))
    assert out.usage.drafted_tokens == 0
    _, out = await run(
        self_drafting, greedy(PROMPTS[0], 32, speculative=SpeculativeOverride(n_max=0))
    )
    assert out.usage.drafted_tokens == 0
    _, out = await run(
        self_drafting, greedy(PROMPTS[0], 32, speculative=SpeculativeOverride(n_max=2))
    )
    assert 0 < out.usage.drafted_tokens <= 2 * 32
    # an n-gram type on a draft-model server: made on first use
    req = greedy(PROMPTS[1], 32, speculative=SpeculativeOverride(type="ngram-map-k"))
    _, out = await run(self_drafting, req)
    assert out.finish_reason == "length"
    with pytest.raises(InvalidRequestError) as e:
        await self_drafting.generate(
            greedy(PROMPTS[0], 8, speculative=SpeculativeOverride(type="magic"))
        )
    assert e.value.param == "speculative"
    plain = await engine_for(repeating_model, SpeculativeConfig(), n_parallel=1, n_ctx=512)
    try:
        with pytest.raises(InvalidRequestError, match="speculative decoding is off"):
            await plain.generate(
                greedy(PROMPTS[0], 8, speculative=SpeculativeOverride(type="ngram-mod"))
            )
        # "none" on a server without speculation is simply honoured
        _, out = await run(plain, greedy(PROMPTS[0], 8, speculative=off))
        assert out.finish_reason == "length"
    finally:
        await _stopped(plain)


async def test_slots_show_the_drafts(self_drafting: Engine) -> None:
    stream = await self_drafting.generate(greedy(PROMPTS[0], 200))
    seen = []
    async for _ in stream:
        seen += [s for s in self_drafting.stats().slots if s.state != 0]
    assert any(s.n_drafted > 0 and s.n_accepted > 0 and s.draft_acceptance > 0 for s in seen)


async def test_mismatched_draft_vocabulary_is_refused(varied_model: Path, tmp_path: Path) -> None:
    other = make_tiny_llama(tmp_path / "gpt2.gguf", vocab_gguf=VOCAB_GPT2)
    config = EngineConfig(model=str(varied_model), n_ctx=512,
                          speculative=SpeculativeConfig(draft_model=str(other)))  # fmt: skip
    engine = Engine(config)
    with pytest.raises(ModelLoadError) as e:
        await engine.start()
    assert str(other) in str(e.value) and str(varied_model) in str(e.value)


async def test_bad_speculative_settings_fail_at_start(varied_model: Path, tmp_path: Path) -> None:
    mamba = make_tiny_mamba(tmp_path / "mamba.gguf")
    cases = [
        (EngineConfig(model=str(mamba), n_ctx=512,
                      speculative=SpeculativeConfig(types=["ngram-mod"])), "recurrent"),
        (EngineConfig(model=str(varied_model), n_ctx=512,
                      speculative=SpeculativeConfig(types=["draft-simple"])), "draft model"),
        (EngineConfig(model=str(varied_model), n_ctx=512,
                      speculative=SpeculativeConfig(types=["ngram-magic"])), "ngram-magic"),
    ]  # fmt: skip
    for config, words in cases:
        with pytest.raises(ModelLoadError, match=words):
            await Engine(config).start()


async def test_policy_pays_at_one_stream_and_holds_back_when_compute_bound() -> None:
    # a step costs 10 ms plus 0.2 ms a token: at one stream almost any draft pays
    # (each size twice: the policy leaves out a size's first decode, which pays one-time costs)
    decodes = [(n, 10.0 + 0.2 * n) for n in (1, 3, 5, 9, 17, 2, 4, 8, 12, 16)] * 2
    [k] = _core.testing.draft_allocate([(16, 0.7, False)], 1, 0, decodes)
    assert 5 <= k <= 16
    # the same acceptance with a step of 2 ms plus 2 ms a token, 16 streams: drafts cost more
    # than they bring
    decodes = [(n, 2.0 + 2.0 * n) for n in (16, 20, 24, 17, 30, 16, 18, 22, 26, 28)] * 2
    ks = _core.testing.draft_allocate([(16, 0.7, False)] * 16, 16, 0, decodes)
    assert sum(ks) == 0
    # near-certain drafts do not pay in it either: the gain stays within the 5 % margin
    ks = _core.testing.draft_allocate([(16, 0.99, False)] * 16, 16, 0, decodes)
    assert sum(ks) == 0
    # in a step that is not compute-bound they do
    decodes = [(n, 30.0 + 0.5 * n) for n in (16, 20, 24, 17, 30, 16, 18, 22, 26, 28)] * 2
    ks = _core.testing.draft_allocate([(16, 0.99, False)] * 16, 16, 0, decodes)
    assert sum(ks) > 16
    # a measured curve that flattens (long batches cheaper per row) is followed, not a line
    decodes = [(1, 24.0), (2, 44.0), (3, 64.0), (33, 400.0), (49, 560.0)] * 2
    [k] = _core.testing.draft_allocate([(48, 0.999, False)], 1, 0, decodes)
    assert k == 48
    # a draft model's steps count too: an expensive one is used less
    decodes = [(n, 10.0 + 0.2 * n) for n in (1, 3, 5, 9, 17, 2, 4, 8, 12, 16)] * 2
    [cheap] = _core.testing.draft_allocate([(16, 0.8, True)], 1, 0, decodes, 1.0)
    [dear] = _core.testing.draft_allocate([(16, 0.8, True)], 1, 0, decodes, 8.0)
    assert cheap > dear >= 0


def _run_policy(steps: int, offer: list[tuple[int, float, bool]], n_gen: int, cost, realized=None):
    """Drives a DraftPolicy as the engine does: allocate, then feed back what the step cost
    (`cost(n_tokens)` ms) and, if given, what it really gave (`realized(k_total)`: tokens, ms).
    Returns the drafted total of each step."""
    p = _core.testing.DraftPolicy()
    for _ in range(3):  # plain steps first, as at a server's start
        p.observe_decode(n_gen, cost(n_gen))
    totals = []
    for _ in range(steps):
        k = sum(p.allocate(offer, n_gen))
        p.observe_decode(n_gen + k, cost(n_gen + k))
        tok, ms = realized(k) if realized else (n_gen, cost(n_gen + k))
        p.observe_step(n_gen, k, tok, ms)
        totals.append(k)
    return p, totals


async def test_policy_recovers_from_a_cost_measured_on_a_busy_machine() -> None:
    """A size measured far too slow (preempted steps) keeps the model from drafting; probes,
    each at most a few plain steps' worth, measure it again: drafts cannot stay off for good."""
    true = lambda n: 27.0 + 7.0 * n  # noqa: E731
    p = _core.testing.DraftPolicy()
    for n in (1, 3, 4, 8, 16):
        p.observe_decode(n, true(n))
    for _ in range(3):
        p.observe_decode(2, 200.0)  # three slow steps: the median says 200 ms (41 in truth)
    offer = [(1, 0.97, False)]
    assert p.allocate(offer, 1) == [0]  # the model believes a draft token dear
    totals = []
    for _ in range(600):
        [k] = p.allocate(offer, 1)
        p.observe_decode(1 + k, true(1 + k))
        p.observe_step(1, k, 1 + k, true(1 + k))  # every draft accepted
        totals.append(k)
    assert 0 < sum(totals[:32]) <= 1  # the first probe, after 32 declined steps
    assert sum(1 for k in totals[-100:] if k > 0) >= 90


async def test_policy_guard_keeps_drafts_off_where_they_really_lose() -> None:
    """The model believes drafts pay (the cost curve says rows are cheap), but steps with
    drafts give fewer tokens per second than plain ones: drafting is held back, but for
    probes."""
    cheap = lambda n: 100.0 + 0.5 * n  # noqa: E731
    offer = [(8, 0.9, False)] * 16
    p, totals = _run_policy(400, offer, 16, cheap, lambda k: (16, 130.0) if k else (16, 100.0))
    assert p.rate_spec(16) < p.rate_plain(16)
    drafting = sum(1 for k in totals[-160:] if k > 0)
    assert drafting <= 160 // _core.testing.DraftPolicy.HOLD_EVERY + 2
    # where they really win, drafting stays on but for a plain step now and then
    p, totals = _run_policy(
        400, offer, 16, cheap, lambda k: (16 + int(k * 0.8), 110.0) if k else (16, 100.0)
    )
    assert p.rate_spec(16) > p.rate_plain(16)
    assert (
        sum(1 for k in totals[-200:] if k > 0)
        >= 200 - 200 // _core.testing.DraftPolicy.PLAIN_EVERY - 2
    )


async def test_policy_knows_how_llama_cpp_cuts_a_batch() -> None:
    """With a KV stream per slot a ubatch takes the same number of tokens from a run of
    consecutive sequences: ragged drafts (or a gap in the busy slots) cost extra ubatches."""
    p = _core.testing.DraftPolicy()
    p.set_layout(True, 512, 64)
    assert p.split([0, 1, 2, 3], [1, 1, 1, 1]) == [4]
    assert p.split([0, 1, 2, 3], [5, 5, 5, 5]) == [20]
    assert p.split([0, 1, 2, 3], [5, 1, 5, 1]) == [4, 4, 4]
    assert p.split([0, 1, 3, 4], [1, 1, 1, 1]) == [2, 2]
    assert p.split([0, 1], [1, 1], 100) == [2, 100]
    p.set_layout(False, 512, 64)
    assert p.split([0, 1, 3, 4], [5, 1, 5, 1], 100) == [112]
    # drafts of the same depth for every slot, where ragged ones would split the step
    cost = lambda n: 100.0 + 1.0 * n  # noqa: E731
    for stream_per_seq in (True, False):
        p = _core.testing.DraftPolicy()
        p.set_layout(stream_per_seq, 512, 64)
        for n in range(1, 90):
            p.observe_decode(n, cost(n))
            p.observe_decode(n, cost(n))
        offer = [(8, 0.95, False), (8, 0.5, False)] * 8
        k = p.allocate(offer, 16, 0)
        if stream_per_seq:
            assert len(set(k)) == 1 and k[0] > 0
        else:
            assert sum(k) > 0 and k[0] > k[1]


async def test_acceptance_estimate() -> None:
    a = 0.5
    for _ in range(20):
        a = _core.testing.update_acceptance(a, 8, 8)
    assert a > 0.9
    for _ in range(20):
        a = _core.testing.update_acceptance(a, 8, 0)
    assert a < 0.1


async def test_policy_learns_from_drafts_it_did_not_verify() -> None:
    """A size's first decode (one-time costs) is left out: one slow 3-token step cannot
    convince the policy that drafts never pay."""
    decodes = [(1, 24.0)] * 5 + [(3, 200.0)] + [(3, 30.0)] * 3
    [k] = _core.testing.draft_allocate([(16, 0.9, False)], 1, 0, decodes)
    assert k > 0
