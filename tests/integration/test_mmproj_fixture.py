"""The tiny projectors of tests/fixtures/tiny_mmproj.py load and encode in libmtmd.

tests/fixtures/mtmd_probe.cpp is compiled against the static llama.cpp libraries of the build
tree and runs a prompt with an image through libmtmd (tokenize, encode, evaluate). ``pip install
.`` leaves that tree in ``build/<wheel tag>/`` (pyproject.toml's ``build-dir``; .ci/run installs
so), and its ``build.ninja`` says which libraries ``_core`` links. Where there is none (llamabox
installed from a wheel), or it was built with loadable backends, or there is no C++ compiler,
the tests skip and say why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llamabox.types import EngineConfig, GenerateRequest, MediaInput, SamplingParams
from tests.conftest import _started, _stopped
from tests.fixtures import REPO_ROOT, make_tiny_llama
from tests.fixtures.tiny_mmproj import (
    make_test_image,
    make_test_png,
    make_tiny_gemma3_mmproj,
    make_tiny_mmproj,
)
from tests.integration.engine_helpers import collect

pytestmark = pytest.mark.integration

PROBE_SOURCE = REPO_ROOT / "tests" / "fixtures" / "mtmd_probe.cpp"
PROMPT = "USER: <__media__>\nWhat is in the image? ASSISTANT:"
GEMMA_PROMPT = (
    "<start_of_turn>user\n<__media__>Describe the image.<end_of_turn>\n<start_of_turn>model\n"
)


@dataclass(frozen=True)
class BuildTree:
    root: Path
    compiler: str
    llama_cpp: Path  # the llama.cpp source the tree was configured with
    link_libraries: list[str]  # _core's, relative to root


def _cache_value(cache: str, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}:[A-Z]+=(.*)$", cache, re.MULTILINE)
    return m.group(1).strip() if m else None


def _find_build_tree() -> BuildTree | str:
    """The build tree of this interpreter's wheel tag (else any), or why there is none."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-"
    trees = sorted((REPO_ROOT / "build").glob("*/build.ninja"))
    trees.sort(key=lambda p: not p.parent.name.startswith(tag))
    if not trees:
        return "no build tree in build/ (llamabox was not built from this checkout)"
    root = trees[0].parent
    cache = (root / "CMakeCache.txt").read_text(errors="replace")
    if _cache_value(cache, "GGML_BACKEND_DL") == "ON":
        return f"{root.name}: ggml built as loadable backends, not static libraries"
    ninja = (root / "build.ninja").read_text(errors="replace")
    m = re.search(r"^build csrc/_core\.[^:]*:.*?^  LINK_LIBRARIES = ([^\n]*)$", ninja, re.M | re.S)
    if not m:
        return f"{root.name}/build.ninja has no link line for _core"
    libs = shlex.split(m.group(1))
    if not all((root / lib).exists() for lib in libs if lib.endswith(".a")):
        return f"{root.name}: llama.cpp's static libraries are not built"
    compiler = _cache_value(cache, "CMAKE_CXX_COMPILER") or shutil.which("c++") or ""
    if not compiler or not shutil.which(compiler):
        return "no C++ compiler"
    llama_cpp = Path(
        _cache_value(cache, "LLAMABOX_LLAMA_CPP_DIR") or REPO_ROOT / "vendor/llama.cpp"
    )
    return BuildTree(root, compiler, llama_cpp, libs)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = _find_build_tree()
    if isinstance(tree, str):
        pytest.skip(tree)
    exe = tmp_path_factory.mktemp("mtmd_probe") / "mtmd_probe"
    includes = ["include", "ggml/include", "tools/mtmd"]
    cmd = [
        tree.compiler,
        "-std=c++17",
        "-O1",
        *(f"-I{tree.llama_cpp / d}" for d in includes),
        str(PROBE_SOURCE),
        "-o",
        str(exe),
        *tree.link_libraries,
    ]
    done = subprocess.run(cmd, cwd=tree.root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{shlex.join(cmd)}\n{done.stderr[-4000:]}"
    return exe


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mmproj")
    return {
        "llama64": make_tiny_llama(d / "tiny-llama.gguf"),
        # a text model as wide as Gemma 3 270M (n_embd 640), for the gemma3 projector; tied
        # embeddings halve its 32k x 640 vocabulary matrices
        "llama640": make_tiny_llama(
            d / "tiny-llama-640.gguf",
            n_embd=640,
            n_head=10,
            n_head_kv=2,
            n_ff=256,
            n_layer=1,
            tie_embeddings=True,
        ),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two different images, then a copy of the first in another file; not square, so that
    libmtmd pads (mlp) or stretches (gemma3) them to the projector's size."""
    d = tmp_path_factory.mktemp("images")
    paths = [d / f"{name}.png" for name in ("a", "b", "a-again")]
    for path, seed in zip(paths, (1, 2, 1), strict=True):
        make_test_png(path, 40, 30, seed)
    return paths


def run_probe(probe: Path, model: Path, mmproj: Path, prompt: str, images: list[Path]) -> Any:
    # Passive OpenMP threads: spinning ones cost a 0.2 ms encode ~200 ms on two busy cores.
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    args = [str(probe), str(model), str(mmproj), prompt, *map(str, images)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def check_runs(out: Any, images: list[Path], n_image_tokens: int, non_causal: bool) -> None:
    assert out["vision"] is True and out["audio"] is False
    assert out["mrope"] is False and out["non_causal"] is non_causal
    runs = out["runs"]
    assert len(runs) == len(images)
    for run, path in zip(runs, images, strict=True):
        assert [c["type"] for c in run["chunks"]] == ["text", "image", "text"]
        image = run["chunks"][1]
        assert image["n_tokens"] == image["n_pos"] == n_image_tokens
        assert image["non_causal"] is non_causal
        assert image["embd_finite"] and image["embd_rms"] > 0.05
        # the helper names a bitmap by the SHA-256 of the file's bytes: a content hash for free
        assert run["bitmap"]["id"] == image["id"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (run["bitmap"]["nx"], run["bitmap"]["ny"]) == (40, 30)
        assert (
            run["n_tokens"]
            == run["n_tokens_placeholder"]
            == sum(c["n_tokens"] for c in run["chunks"])
        )
        assert run["n_past"] == run["n_pos"] == run["n_tokens"]
    a, b, a_again = runs
    assert a["logits"] != b["logits"], "another image must change the logits"
    assert a["chunks"][1]["embd_first"] != b["chunks"][1]["embd_first"]
    assert a["logits"] == a_again["logits"] and a["logits_sum"] == a_again["logits_sum"]


@pytest.mark.parametrize(
    ("make", "kwargs", "text_model", "n_image_tokens", "non_causal"),
    [
        (make_tiny_mmproj, {}, "llama64", 16, False),
        (make_tiny_mmproj, {"image_size": 48}, "llama64", 36, False),
        (make_tiny_gemma3_mmproj, {}, "llama640", 16, True),
        (make_tiny_gemma3_mmproj, {"n_merge": 2}, "llama640", 64, True),
    ],
    ids=["mlp", "mlp-image48", "gemma3", "gemma3-merge2"],
)
def test_projector(
    probe: Path,
    models: dict[str, Path],
    images: list[Path],
    tmp_path: Path,
    make: Callable[..., Path],
    kwargs: dict[str, int],
    text_model: str,
    n_image_tokens: int,
    non_causal: bool,
) -> None:
    """The image becomes n_image_tokens embeddings of the text model's width (the MLP type
    attends causally, Gemma 3's bidirectionally within the image)."""
    mmproj = make(tmp_path / "mmproj.gguf", **kwargs)
    out = run_probe(probe, models[text_model], mmproj, PROMPT, images)
    check_runs(out, images, n_image_tokens, non_causal=non_causal)
    assert out["n_embd"] == (64 if text_model == "llama64" else 640)


def test_qwen2vl_projector_takes_mrope_positions(probe: Path, tmp_path: Path) -> None:
    """Qwen2-VL's projector on a qwen2vl text model: libmtmd decodes with M-RoPE, the image
    keeps its aspect ratio (a 64 x 48 image is an 8 x 6 grid: 48 tokens over 8 positions),
    wrapped in <|vision_start|>/<|vision_end|> text."""
    model = make_tiny_llama(tmp_path / "tiny-qwen2vl.gguf", arch="qwen2vl")
    mmproj = make_tiny_mmproj(tmp_path / "mmproj-qwen2vl.gguf", projector="qwen2vl")
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "a-again")]
    for path, seed in zip(paths, (1, 2, 1), strict=True):
        make_test_png(path, 64, 48, seed)
    out = run_probe(probe, model, mmproj, PROMPT, paths)
    assert out["vision"] is True and out["mrope"] is True and out["non_causal"] is False
    for run in out["runs"]:
        assert [c["type"] for c in run["chunks"]] == ["text", "image", "text"]
        image = run["chunks"][1]
        assert (image["n_tokens"], image["n_pos"]) == (48, 8)
        assert image["embd_finite"] and image["embd_rms"] > 0.05
        assert run["n_tokens"] == sum(c["n_tokens"] for c in run["chunks"])
        assert run["n_past"] == run["n_pos"] == run["n_tokens"] - 40
    a, b, a_again = out["runs"]
    assert a["logits"] != b["logits"] and a["logits"] == a_again["logits"]


async def _engine_top(
    model: Path, mmproj: Path, prompts: list[str], image: bytes, **config: int
) -> list[tuple[dict[int, float], int, int]]:
    """Each prompt (``<__media__>`` marking the image) in turn on one slot of a new engine:
    the first token's top-8 logprobs, the prompt's tokens and how many of them were cached."""
    engine = await _started(
        EngineConfig(
            model=str(model), mmproj=str(mmproj), n_parallel=1, n_ctx=1024, n_threads=2, **config
        )
    )
    try:
        mark = engine.media_marker
        assert mark is not None
        out = []
        for prompt in prompts:
            req = GenerateRequest(
                prompt=prompt.replace("<__media__>", mark),
                media=[MediaInput(data=image, param="image")],
                max_tokens=1,
                sampling=SamplingParams(temperature=0.0, logprobs=True, n_probs=8),
            )
            outs, last = await collect(engine, req)
            lps = [lp for o in outs for lp in o.logprobs or []]
            assert lps and last.usage is not None
            top = {t.token: t.logprob for t in lps[0].top}
            out.append((top, last.usage.prompt_tokens, last.usage.cached_tokens))
        return out
    finally:
        await _stopped(engine)


def _same_top(engine: dict[int, float], ref: list[list[float]], tol: float = 2e-3) -> None:
    want = {int(t): lp for t, lp in ref}
    shared = engine.keys() & want.keys()
    assert len(shared) >= 6, (engine, want)  # near-ties at the bottom may swap
    assert all(abs(engine[t] - want[t]) < tol for t in shared), (engine, want)


@pytest.mark.asyncio(loop_scope="session")
async def test_engine_takes_libmtmd_positions_under_mrope(probe: Path, tmp_path: Path) -> None:
    """The engine decodes an M-RoPE image and the text after it at libmtmd's positions: the
    next-token distribution equals mtmd_helper_eval_chunks', with the image decoded whole or in
    16-row pieces, and again after a cached prefix that holds the image."""
    model = make_tiny_llama(tmp_path / "tiny-qwen2vl.gguf", arch="qwen2vl")
    mmproj = make_tiny_mmproj(tmp_path / "mmproj-qwen2vl.gguf", projector="qwen2vl")
    image = tmp_path / "a.png"
    data = make_test_png(image, 64, 48, 1)
    prompts = [PROMPT + " It is", PROMPT + " It is", PROMPT + " Surely it was"]
    refs = [run_probe(probe, model, mmproj, p, [image])["runs"][0] for p in prompts]
    assert refs[0]["chunks"][1]["n_pos"] == 8 and refs[0]["chunks"][1]["n_tokens"] == 48
    for config in ({}, {"n_batch": 16, "n_ubatch": 16}):
        runs = await _engine_top(model, mmproj, prompts, data, **config)
        for (top, n_prompt, _), ref in zip(runs, refs, strict=True):
            assert n_prompt == ref["n_tokens"]
            _same_top(top, ref["top"])
        (_, _, cold), (_, n_prompt, again), (_, _, other) = runs
        assert cold == 0
        assert again == n_prompt - 1  # all but the last token, which is always decoded
        n_shared = len(refs[0]["chunks"][0]["tokens"]) + 48
        assert other >= n_shared  # the text before and the image


def test_projector_width_must_match_the_text_model(
    probe: Path, models: dict[str, Path], images: list[Path], tmp_path: Path
) -> None:
    mmproj = make_tiny_mmproj(tmp_path / "mmproj-mlp-640.gguf", n_embd_text=640)
    args = [str(probe), str(models["llama64"]), str(mmproj), PROMPT, str(images[0])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"error": "mtmd_init_from_file failed"}
    assert "mismatch between text model (n_embd = 64) and mmproj (n_embd = 640)" in done.stderr


def test_image_formats(probe: Path, models: dict[str, Path], tmp_path: Path) -> None:
    """stb_image decodes JPEG, BMP and GIF as well; WebP only a build with MTMD_VIDEO (ffmpeg)
    decodes, and ours has none (LLAMA_SUBPROCESS is off), so the server must decode WebP itself
    or refuse it."""
    mmproj = make_tiny_mmproj(tmp_path / "mmproj-mlp.gguf")
    paths = []
    for fmt in ("JPEG", "BMP", "GIF"):
        paths.append(tmp_path / f"image.{fmt.lower()}")
        make_test_image(paths[-1], 40, 30, 1, format=fmt)
    out = run_probe(probe, models["llama64"], mmproj, PROMPT, paths)
    assert [r["chunks"][1]["n_tokens"] for r in out["runs"]] == [16, 16, 16]
    assert [(r["bitmap"]["nx"], r["bitmap"]["ny"]) for r in out["runs"]] == [(40, 30)] * 3

    from PIL import features

    if not features.check("webp"):
        pytest.skip("this Pillow writes no WebP")
    webp = tmp_path / "image.webp"
    make_test_image(webp, 40, 30, 1, format="WEBP")
    args = [str(probe), str(models["llama64"]), str(mmproj), PROMPT, str(webp)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert json.loads(done.stdout)["runs"] == [{"error": "image not decoded"}]


def test_fixtures_are_deterministic(tmp_path: Path) -> None:
    for make, kwargs in (
        (make_tiny_mmproj, {}),
        (make_tiny_gemma3_mmproj, {}),
        (make_tiny_mmproj, {"projector": "qwen2vl"}),
    ):
        first = make(tmp_path / "1.gguf", seed=3, **kwargs).read_bytes()
        assert make(tmp_path / "2.gguf", seed=3, **kwargs).read_bytes() == first
        assert make(tmp_path / "3.gguf", seed=4, **kwargs).read_bytes() != first
    assert make_test_png(None, 8, 8, 5) == make_test_png(tmp_path / "x.png", 8, 8, 5)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert make_test_png(None, 8, 8, 5) != make_test_png(None, 8, 8, 6)


@pytest.mark.slow
def test_gemma3_projector_on_gemma(
    probe: Path, gemma_model_path: Path, images: list[Path], tmp_path: Path
) -> None:
    """The real Gemma 3 270M takes the tiny gemma3 projector's images: libmtmd wraps them in
    its <start_of_image>/<end_of_image> tokens and decodes them with non-causal attention."""
    mmproj = make_tiny_gemma3_mmproj(tmp_path / "mmproj-gemma3.gguf")
    out = run_probe(probe, gemma_model_path, mmproj, GEMMA_PROMPT, images)
    check_runs(out, images, 16, non_causal=True)
    first, image, last = out["runs"][0]["chunks"]
    assert first["tokens"][-1] == 255999 and last["tokens"][0] == 256000  # Gemma 3's ids
