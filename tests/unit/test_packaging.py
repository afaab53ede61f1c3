"""Per-backend builds and wheels: vendor/backends.py's table, build_backend.py's hooks, the wheel
renaming, docs/backends.md, cibuildwheel's matrix and the wheels workflow.

Nothing here compiles llama.cpp: the hooks run on a tiny CMake project of no language, the
renaming on wheels made here, nvcc is a fake. Offline, seconds.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests.unit.vendor_modules import load_vendor

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "vendor"
GGML = VENDOR / "llama.cpp" / "ggml"
DOCS = ROOT / "docs" / "backends.md"
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"
EXPECTED = {"cpu", "cuda12", "cuda13", "rocm", "sycl", "metal", "cann", "musa", "vulkan"}
# What the hooks and plan() read from the environment: none of it may leak in from the caller.
BUILD_ENV = (
    "LLAMABOX_BACKEND", "CIBUILDWHEEL", "CMAKE_ARGS", "SKBUILD_CMAKE_ARGS",
    "SKBUILD_CMAKE_DEFINE", "SKBUILD_BUILD_DIR", "CUDACXX", "CUDA_PATH", "CUDAToolkit_ROOT",
)  # fmt: skip


backends = load_vendor("backends.py")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BUILD_ENV:
        monkeypatch.delenv(name, raising=False)


# ---- the table ----


def test_the_table_has_every_backend_once_with_its_wheel_name() -> None:
    assert set(backends.BACKENDS) == EXPECTED
    for name, b in backends.BACKENDS.items():
        assert b.name == name
        assert b.distribution == ("llamabox" if name == "cpu" else f"llamabox-{name}")
        assert b.defines.get("GGML_NATIVE") == "OFF", name  # every wheel is portable
        assert b.platforms and set(b.platforms) <= {"linux", "macos", "windows"}
        if name == "cpu":
            assert b.switch is None
        else:
            assert b.switch is not None and b.defines[b.switch] == "ON", name
        assert b.cuda_major == (int(name[4:]) if name.startswith("cuda") else None)
    # one switch per backend family: cuda12 and cuda13 share GGML_CUDA, nothing else shares
    switches = [b.switch for b in backends.BACKENDS.values() if b.switch]
    assert sorted(set(switches)) == sorted(
        {"GGML_CUDA", "GGML_HIP", "GGML_SYCL", "GGML_METAL", "GGML_CANN", "GGML_MUSA"}
        | {"GGML_VULKAN"}
    )


def _ggml_declared() -> set[str]:
    """Variables ggml declares: option(), set(... CACHE ...), and ggml_add_backend(X)."""
    text = (GGML / "CMakeLists.txt").read_text()
    names = set(re.findall(r"^\s*option\s*\(\s*(\w+)", text, re.M))
    names |= set(re.findall(r"^\s*set\s*\(\s*(\w+)\s[^)]*\bCACHE\b", text, re.M))
    src = (GGML / "src" / "CMakeLists.txt").read_text()
    names |= {f"GGML_{b.upper()}" for b in re.findall(r"^ggml_add_backend\((\w+)\)", src, re.M)}
    return names


def _backend_cmake(b: ModuleType) -> str:
    sub = "ggml-cpu" if b.switch is None else "ggml-" + b.switch.removeprefix("GGML_").lower()
    return (GGML / "src" / sub / "CMakeLists.txt").read_text()


@pytest.mark.skipif(not GGML.is_dir(), reason="vendor/llama.cpp is not fetched (a build does it)")
def test_every_option_of_the_table_exists_in_the_pinned_llama_cpp() -> None:
    declared = _ggml_declared()
    assert {"GGML_CUDA", "GGML_CANN", "GGML_NATIVE", "GGML_CPU_ALL_VARIANTS"} <= declared
    # CMake's own variables (compilers, CUDA architectures) as llama.cpp's build guides use them
    guides = "".join(p.read_text() for p in (GGML.parent / "docs").rglob("*.md"))
    for b in backends.BACKENDS.values():
        if b.switch:
            assert b.switch in declared, b.name  # the switch is ggml's own, not a guess
        own = _backend_cmake(b)
        for name in [*b.defines, *b.knobs]:
            word = rf"\b{re.escape(name)}\b"
            known = name in declared or re.search(word, own) is not None
            if name.startswith("CMAKE_"):
                known = known or re.search(word, guides) is not None
            assert known, f"{b.name}: {name} is not in ggml's CMake"


def test_the_build_records_the_backend_in_core() -> None:
    text = (ROOT / "csrc" / "CMakeLists.txt").read_text()
    assert re.search(r"set\(LLAMABOX_BACKEND \"custom\" CACHE STRING", text)
    assert 'LLAMABOX_BACKEND_NAME="${LLAMABOX_BACKEND}"' in text


# ---- docs/backends.md ----


def _docs() -> str:
    return DOCS.read_text()


def test_the_docs_carry_the_table_as_the_module_prints_it() -> None:
    match = re.search(
        r"<!-- backends table: python vendor/backends.py --markdown -->\n(.*?)"
        r"<!-- end of backends table -->",
        _docs(),
        re.S,
    )
    assert match, "docs/backends.md lost its table markers"
    assert match[1] == backends.markdown_table(), "run python vendor/backends.py --markdown"
    out = subprocess.run(
        [sys.executable, str(VENDOR / "backends.py"), "--markdown"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out == match[1]


def test_the_docs_have_a_section_and_a_pip_command_per_backend() -> None:
    docs = _docs()
    sections = re.split(r"^## ", docs, flags=re.M)
    for b in backends.BACKENDS.values():
        section = next((s for s in sections if f"`{b.name}`" in s.split("\n", 1)[0]), None)
        assert section is not None, f"no section for {b.name}"
        assert f"`{b.distribution}`" in section.split("\n", 1)[0], b.name
        commands = re.findall(r"```sh\n(.*?)```", section, re.S)
        assert any(f"-Cllamabox.backend={b.name}" in c for c in commands), b.name
        for knob in b.knobs:
            assert knob in docs, f"{b.name}: docs/backends.md does not explain {knob}"
    assert "What was built where" in docs
    assert "GGML_BACKEND_DL" in docs and "GGML_CPU_ALL_VARIANTS" in docs


# ---- choosing a backend: plan() ----


def test_no_backend_is_the_local_build_as_before() -> None:
    p = backends.plan({"cmake.define.FOO": "1"}, {}, platform="linux")
    assert p.backend is None and not p.renames and p.distribution == "llamabox"
    assert p.config_settings == {"cmake.define.FOO": "1", "cmake.define.LLAMABOX_BACKEND": "cpu"}
    # raw switches, or macOS's Metal-by-default: not a build of the table
    assert backends.plan({"cmake.define.GGML_CUDA": "ON"}, {}, "linux").recorded == "custom"
    assert backends.plan({"cmake.define.GGML_CUDA": "OFF"}, {}, "linux").recorded == "cpu"
    assert backends.plan(None, {}, platform="darwin").recorded == "custom"
    assert backends.plan({"cmake.define.GGML_METAL": "OFF"}, {}, "darwin").recorded == "cpu"


def test_the_config_setting_wins_over_the_environment() -> None:
    env = {"LLAMABOX_BACKEND": "vulkan"}
    assert backends.plan({}, env).backend.name == "vulkan"
    assert backends.plan({"llamabox.backend": "cuda12"}, env).backend.name == "cuda12"
    assert backends.plan({"llamabox.backend": ["cpu", "ROCm "]}, {}).backend.name == "rocm"
    assert backends.plan({}, {"LLAMABOX_BACKEND": " "}).backend is None
    # cibuildwheel builds for other machines: cpu, never native
    assert backends.plan({}, {"CIBUILDWHEEL": "1"}).backend.name == "cpu"
    with pytest.raises(backends.BackendError, match="unknown llamabox backend 'cuda'; one of: cpu"):
        backends.plan({"llamabox.backend": "cuda"}, {})
    with pytest.raises(backends.BackendError, match="unknown config setting llamabox.backends"):
        backends.plan({"llamabox.backends": "cuda12"}, {})
    with pytest.raises(backends.BackendError, match="CMAKE_ARGS cannot be split"):
        backends.plan({}, {"CMAKE_ARGS": "-DFOO='unbalanced"})


def test_a_backend_adds_its_defines_a_build_dir_and_its_name() -> None:
    p = backends.plan({"llamabox.backend": "cuda12", "wheel.py-api": "cp311"}, {}, "linux")
    assert p.config_settings == {
        "wheel.py-api": "cp311",
        "cmake.define.GGML_CUDA": "ON",
        "cmake.define.GGML_NATIVE": "OFF",
        "cmake.define.GGML_CUDA_NCCL": "OFF",
        "cmake.define.LLAMABOX_BACKEND": "cuda12",
        "cmake.define.LLAMABOX_RPATH": "$ORIGIN/../nvidia/cuda_runtime/lib;"
        "$ORIGIN/../nvidia/cublas/lib",
        "build-dir": "build/{wheel_tag}_cuda12",
    }  # and no llamabox.* key: scikit-build-core refuses keys it does not know
    assert p.distribution == "llamabox-cuda12" and p.renames
    assert p.requires == ("nvidia-cuda-runtime-cu12>=12.8,<13", "nvidia-cublas-cu12>=12.8,<13")
    windows = backends.plan({"llamabox.backend": "cuda12"}, {}, "win32")
    assert "cmake.define.LLAMABOX_RPATH" not in windows.config_settings  # no RPATH there
    cpu = backends.plan({"llamabox.backend": "cpu"}, {}, "darwin")
    assert cpu.recorded == "cpu" and not cpu.renames
    assert cpu.config_settings["cmake.define.GGML_METAL"] == "OFF"
    assert cpu.config_settings["build-dir"] == "build/{wheel_tag}_cpu"


@pytest.mark.parametrize(
    ("settings", "environ"),
    [
        ({"cmake.define.GGML_NATIVE": "ON"}, {}),
        ({"skbuild.cmake.define.GGML_NATIVE": "ON"}, {}),
        ({"cmake.args": "-DFOO=1;-DGGML_NATIVE=ON"}, {}),
        ({"cmake.args": ["-D", "GGML_NATIVE:BOOL=ON"]}, {}),
        ({}, {"CMAKE_ARGS": "-DFOO='a b' -DGGML_NATIVE:BOOL=ON"}),
        ({}, {"SKBUILD_CMAKE_ARGS": "-DGGML_NATIVE=ON;-DFOO=1"}),
        ({}, {"SKBUILD_CMAKE_DEFINE": "FOO=1;GGML_NATIVE=ON"}),
    ],
)
def test_what_the_user_defines_is_never_overridden(
    settings: dict[str, str | list[str]], environ: dict[str, str]
) -> None:
    p = backends.plan({"llamabox.backend": "vulkan", **settings}, environ)
    assert p.explicit["GGML_NATIVE"] == "ON"
    assert "GGML_NATIVE" not in p.added
    assert p.config_settings.get("cmake.define.GGML_NATIVE", "ON") == "ON"
    assert p.added["GGML_VULKAN"] == "ON"


def test_the_build_dir_and_the_switch_of_the_user_stand() -> None:
    p = backends.plan({"llamabox.backend": "metal", "build-dir": "b/{wheel_tag}"}, {})
    assert p.config_settings["build-dir"] == "b/{wheel_tag}"
    p = backends.plan({"llamabox.backend": "metal"}, {"SKBUILD_BUILD_DIR": "b"})
    assert "build-dir" not in p.config_settings
    assert backends.plan({"llamabox.backend": "cuda13", "cmake.define.GGML_CUDA": "1"}, {})
    with pytest.raises(backends.BackendError, match="GGML_CUDA=OFF: drop one of them"):
        backends.plan({"llamabox.backend": "cuda13", "cmake.define.GGML_CUDA": "OFF"}, {})


# ---- the CUDA toolkit of a cuda<N> wheel ----


def _fake_nvcc(directory: Path, release: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    nvcc = directory / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.1'\n"
    )
    nvcc.chmod(0o755)
    return nvcc


@pytest.mark.skipif(os.name == "nt", reason="the fake nvcc is a shell script")
def test_a_cuda_wheel_is_built_by_its_cuda_major_only(tmp_path: Path) -> None:
    nvcc12 = _fake_nvcc(tmp_path / "cuda-12" / "bin", "12.8")
    nvcc13 = _fake_nvcc(tmp_path / "cuda-13" / "bin", "13.0")
    env = {"PATH": str(nvcc13.parent), "CUDA_PATH": str(tmp_path / "cuda-12")}
    p = backends.plan({"llamabox.backend": "cuda12"}, env)
    backends.check_toolchain(p, env)  # CUDA_PATH comes before PATH, as in FindCUDAToolkit
    assert p.config_settings["cmake.define.CMAKE_CUDA_COMPILER"] == str(nvcc12)

    env = {"PATH": str(nvcc13.parent)}
    p = backends.plan({"llamabox.backend": "cuda12"}, env)
    with pytest.raises(backends.BackendError, match=r"is CUDA 13\.0.*LLAMABOX_BACKEND=cuda13"):
        backends.check_toolchain(p, env)
    # the user's compiler is checked, and left as given
    settings = {"llamabox.backend": "cuda13", "cmake.define.CMAKE_CUDA_COMPILER": str(nvcc13)}
    p = backends.plan(settings, {"CUDACXX": str(nvcc12)})
    backends.check_toolchain(p, {"CUDACXX": str(nvcc12)})
    assert "CMAKE_CUDA_COMPILER" not in p.added
    p = backends.plan({"llamabox.backend": "cuda13"}, {"CUDACXX": str(nvcc12)})
    with pytest.raises(backends.BackendError, match="needs CUDA 13"):
        backends.check_toolchain(p, {"CUDACXX": str(nvcc12)})
    # no toolchain check for other backends, nor for none
    backends.check_toolchain(backends.plan({"llamabox.backend": "vulkan"}, {}), {})
    backends.check_toolchain(backends.plan({}, {}), {})


def test_no_nvcc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends.shutil, "which", lambda *a, **k: None)
    p = backends.plan({"llamabox.backend": "cuda12"}, {})
    with pytest.raises(backends.BackendError, match="no nvcc was found.*CMAKE_CUDA_COMPILER="):
        backends.check_toolchain(p, {})


# ---- renaming a wheel ----


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


METADATA = """\
Metadata-Version: 2.1
Name: llamabox
Version: 0.1.0
Summary: Name: not a field here
Requires-Dist: numpy>=1.24
Requires-Dist: llamabox-extras>=1; extra == "test"
Provides-Extra: test
Provides-Extra: dev
Requires-Dist: llamabox[test]; extra == "dev"
Description-Content-Type: text/markdown

# llamabox
Name: llamabox stays as it is in the description.
"""


def make_wheel(directory: Path, tag: str = "py3-none-any") -> Path:
    """A wheel as scikit-build-core writes one, with a valid RECORD."""
    dist_info = "llamabox-0.1.0.dist-info"
    files: dict[str, tuple[bytes, int]] = {
        "llamabox/__init__.py": (b"VERSION = '0.1.0'\n", 0o644),
        "llamabox/_core.abi3.so": (b"\x7fELF fake", 0o755),
        f"{dist_info}/METADATA": (METADATA.encode(), 0o644),
        f"{dist_info}/WHEEL": (b"Wheel-Version: 1.0\nTag: py3-none-any\n", 0o644),
        f"{dist_info}/entry_points.txt": (b"[console_scripts]\nllamabox = llamabox.cli:m\n", 0o644),
        f"{dist_info}/licenses/LICENSE": (b"MIT\n", 0o644),
        "llamabox-0.1.0.data/scripts/helper": (b"#!python\n", 0o755),
    }  # fmt: skip
    wheel = directory / f"llamabox-0.1.0-{tag}.whl"
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, (d, _) in files.items())
    record += f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, (data, mode) in files.items():
            info = zipfile.ZipInfo(path, (2024, 1, 2, 3, 4, 6))
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        z.writestr(f"{dist_info}/RECORD", record)
    return wheel


def check_wheel(wheel: Path, name: str) -> dict[str, bytes]:
    """Every file is in RECORD once with its true hash and size; returns the contents."""
    with zipfile.ZipFile(wheel) as z:
        contents = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    escaped = re.sub(r"[-_.]+", "_", name).lower()
    assert wheel.name.startswith(f"{escaped}-0.1.0-")
    dist_info = f"{escaped}-0.1.0.dist-info"
    rows = list(csv.reader(io.StringIO(contents[f"{dist_info}/RECORD"].decode())))
    assert sorted(r[0] for r in rows) == sorted(contents), "RECORD lists every file, once"
    for path, digest, size in rows:
        if path == f"{dist_info}/RECORD":
            assert (digest, size) == ("", "")
        else:
            assert digest == _record_hash(contents[path]) and int(size) == len(contents[path])
    if escaped != "llamabox":
        assert not [n for n in contents if n.startswith("llamabox-0.1.0.")], "old names left"
    return contents


def test_a_renamed_wheel_is_a_valid_wheel_of_the_new_name(tmp_path: Path) -> None:
    from packaging.metadata import Metadata
    from packaging.utils import parse_wheel_filename

    wheel = make_wheel(tmp_path)
    renamed = backends.rename_wheel(wheel, "llamabox-cuda12")
    assert renamed.name == "llamabox_cuda12-0.1.0-py3-none-any.whl"
    assert not wheel.exists() and renamed.exists()
    assert parse_wheel_filename(renamed.name)[0] == "llamabox-cuda12"
    contents = check_wheel(renamed, "llamabox-cuda12")
    assert contents["llamabox/_core.abi3.so"] == b"\x7fELF fake"
    assert "llamabox_cuda12-0.1.0.data/scripts/helper" in contents
    assert "llamabox_cuda12-0.1.0.dist-info/licenses/LICENSE" in contents

    text = contents["llamabox_cuda12-0.1.0.dist-info/METADATA"].decode()
    meta = Metadata.from_email(text, validate=True)
    assert meta.name == "llamabox-cuda12" and str(meta.version) == "0.1.0"
    assert meta.provides_dist == ["llamabox (0.1.0)"]
    requires = sorted(str(r) for r in meta.requires_dist or [])
    assert requires == sorted(
        ['llamabox-cuda12[test]; extra == "dev"', 'llamabox-extras>=1; extra == "test"']
        + ["numpy>=1.24"]
    )  # the self-reference follows the name; another project that starts so does not
    assert "Name: llamabox stays as it is in the description." in text
    assert "Summary: Name: not a field here" in text

    with zipfile.ZipFile(renamed) as z:  # file modes survive (the .so stays executable)
        mode = z.getinfo("llamabox/_core.abi3.so").external_attr >> 16
    assert mode & 0o777 == 0o755


def test_pip_and_importlib_read_the_renamed_wheel(tmp_path: Path) -> None:
    renamed = backends.rename_wheel(make_wheel(tmp_path), "llamabox-vulkan")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--ignore-installed", "--quiet", "--disable-pip-version-check", "--report", "-",
         str(renamed)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    [item] = json.loads(out)["install"]
    assert item["metadata"]["name"] == "llamabox-vulkan"
    assert item["metadata"]["provides_dist"] == ["llamabox (0.1.0)"]

    site = tmp_path / "site"
    with zipfile.ZipFile(renamed) as z:
        z.extractall(site)
    [dist] = list(importlib.metadata.distributions(path=[str(site)]))
    assert dist.metadata["Name"] == "llamabox-vulkan"
    assert {str(f) for f in dist.files or []} >= {"llamabox/__init__.py", "llamabox/_core.abi3.so"}
    assert [ep.name for ep in dist.entry_points] == ["llamabox"]


def test_renaming_to_the_same_name_only_rewrites_record(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "cp311-cp311-linux_x86_64")
    same = backends.rename_wheel(wheel, "llamabox")
    assert same == wheel and same.exists()
    contents = check_wheel(same, "llamabox")
    assert b"Provides-Dist" not in contents["llamabox-0.1.0.dist-info/METADATA"]


def test_a_prepared_dist_info_is_renamed_like_the_wheel(tmp_path: Path) -> None:
    prepared = tmp_path / "llamabox-0.1.0.dist-info"
    prepared.mkdir()
    (prepared / "METADATA").write_text(METADATA)
    new = backends.rename_dist_info(str(tmp_path), prepared.name, "llamabox-rocm")
    assert new == "llamabox_rocm-0.1.0.dist-info" and not prepared.exists()
    text = (tmp_path / new / "METADATA").read_text()
    assert text.startswith("Metadata-Version: 2.1\nName: llamabox-rocm\n")
    # what build_wheel then writes into the wheel is the same METADATA
    wheel = backends.rename_wheel(make_wheel(tmp_path), "llamabox-rocm")
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{new}/METADATA").decode() == text


# ---- the hooks, end to end, on a project of no language ----

TINY_CMAKE = """\
cmake_minimum_required(VERSION 3.15)
project(tiny LANGUAGES NONE)
file(WRITE "${CMAKE_BINARY_DIR}/got.txt"
     "${LLAMABOX_BACKEND} GGML_VULKAN=${GGML_VULKAN} GGML_NATIVE=${GGML_NATIVE}")
install(FILES "${CMAKE_BINARY_DIR}/got.txt" DESTINATION llamabox)
"""
TINY_PYPROJECT = """\
[build-system]
requires = ["scikit-build-core>=0.10"]
build-backend = "build_backend"

[project]
name = "llamabox"
version = "0.1.0"
optional-dependencies = { test = ["pytest"], dev = ["llamabox[test]"] }

[tool.scikit-build]
minimum-version = "0.10"
wheel.packages = ["llamabox"]
"""


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    project = tmp_path / "project"
    (project / "llamabox").mkdir(parents=True)
    (project / "llamabox" / "__init__.py").write_text("")
    (project / "CMakeLists.txt").write_text(TINY_CMAKE)
    (project / "pyproject.toml").write_text(TINY_PYPROJECT)
    monkeypatch.chdir(project)  # scikit-build-core reads ./pyproject.toml
    return project


@pytest.fixture(scope="module")
def build_backend() -> Iterator[ModuleType]:
    pytest.importorskip("scikit_build_core.build")
    yield load_vendor("build_backend.py", name="_llamabox_build_backend_for_packaging")


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_the_hooks_build_a_renamed_wheel_as_pip_calls_them(
    kind: str, tiny_project: Path, build_backend: ModuleType, tmp_path: Path
) -> None:
    settings = {"llamabox.backend": "vulkan", "cmake.define.GGML_NATIVE": "ON"}
    metadata_dir, wheel_dir = tmp_path / "meta", tmp_path / "wheels"
    metadata_dir.mkdir()
    wheel_dir.mkdir()
    # pip's order: requirements, metadata, then the wheel given that metadata
    assert "scikit-build-core" not in " ".join(
        getattr(build_backend, f"get_requires_for_build_{kind}")(settings)
    )
    dist_info = getattr(build_backend, f"prepare_metadata_for_build_{kind}")(
        str(metadata_dir), settings
    )
    assert dist_info == "llamabox_vulkan-0.1.0.dist-info"
    built = getattr(build_backend, f"build_{kind}")(
        str(wheel_dir), settings, str(metadata_dir / dist_info)
    )
    assert built.startswith("llamabox_vulkan-0.1.0-") and os.listdir(wheel_dir) == [built]
    contents = check_wheel(wheel_dir / built, "llamabox-vulkan")
    prepared = (metadata_dir / dist_info / "METADATA").read_bytes()
    assert contents[f"{dist_info}/METADATA"] == prepared
    if kind == "wheel":  # the backend reached CMake; the user's GGML_NATIVE=ON stood
        assert contents["llamabox/got.txt"] == b"vulkan GGML_VULKAN=ON GGML_NATIVE=ON"
    assert [p.name for p in (tiny_project / "build").iterdir()][0].endswith("_vulkan")


@pytest.mark.parametrize("how", ["config-setting", "environment"])
def test_pip_builds_and_installs_the_renamed_wheel(
    how: str, tiny_project: Path, build_backend: ModuleType, tmp_path: Path
) -> None:
    # The README's commands, on the tiny project: pip's own flow (metadata, wheel, its name check).
    (tiny_project / "vendor").mkdir()
    for name in ("build_backend.py", "backends.py"):
        shutil.copy(VENDOR / name, tiny_project / "vendor" / name)
    pyproject = tiny_project / "pyproject.toml"
    backend = 'build-backend = "build_backend"\n'
    pyproject.write_text(
        pyproject.read_text().replace(backend, backend + 'backend-path = ["vendor"]\n')
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = dict(os.environ)
    if how == "config-setting":
        args = ["wheel", ".", "--no-deps", "-w", str(tmp_path / "dist")]
        args += ["-Cllamabox.backend=cuda13", "-Ccmake.define.GGML_CUDA=ON"]
        env["CUDACXX"] = str(_fake_nvcc(tmp_path / "cuda" / "bin", "13.0"))
    else:
        args = ["install", ".", "--no-deps", "--target", str(tmp_path / "site")]
        env["LLAMABOX_BACKEND"] = "vulkan"
    run = subprocess.run(
        [*pip, *args, "--no-build-isolation", "--no-index"],
        cwd=tiny_project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    if how == "config-setting":
        [wheel] = (tmp_path / "dist").iterdir()
        assert wheel.name.startswith("llamabox_cuda13-0.1.0-")
        contents = check_wheel(wheel, "llamabox-cuda13")
        assert contents["llamabox/got.txt"].startswith(b"cuda13 ")
    else:
        site = tmp_path / "site"
        assert (site / "llamabox" / "got.txt").read_text().startswith("vulkan GGML_VULKAN=ON")
        [dist] = list(importlib.metadata.distributions(path=[str(site)]))
        assert dist.metadata["Name"] == "llamabox-vulkan"


def test_the_hooks_without_a_backend_build_as_before(
    tiny_project: Path, build_backend: ModuleType, tmp_path: Path
) -> None:
    built = build_backend.build_wheel(str(tmp_path), {})
    assert built.startswith("llamabox-0.1.0-")
    contents = check_wheel(tmp_path / built, "llamabox")
    assert contents["llamabox/got.txt"] == b"cpu GGML_VULKAN= GGML_NATIVE="
    assert not (tiny_project / "build").exists()  # scikit-build-core's own build directory


def test_a_wrong_backend_ends_the_build_with_its_message(
    tiny_project: Path, build_backend: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_backend.get_requires_for_build_wheel({"llamabox.backend": "opencl"})
    assert e.value.code == 1
    assert "llamabox: unknown llamabox backend 'opencl'" in capsys.readouterr().err


def test_an_sdist_never_sees_our_settings(
    build_backend: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[object] = []

    def build_sdist(directory: str, config_settings: object) -> str:
        seen.append(config_settings)
        return "llamabox-0.1.0.tar.gz"

    monkeypatch.setattr(build_backend, "_load_fetch", lambda: type("F", (), {"main": lambda a: 0}))
    monkeypatch.setattr(build_backend._skbuild, "build_sdist", build_sdist)
    assert build_backend.build_sdist(str(tmp_path), {"llamabox.backend": "cuda12", "a": "b"})
    assert seen == [{"a": "b"}]


# ---- cibuildwheel and the workflow ----


def _pyproject() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize(
    ("platform", "tags"),
    [
        ("linux", ["manylinux_x86_64", "manylinux_aarch64"]),
        ("macos", ["macosx_arm64"]),
        ("windows", ["win_amd64"]),
    ],
)
def test_cibuildwheel_builds_cpython_3_10_to_3_13(platform: str, tags: list[str]) -> None:
    if importlib.util.find_spec("cibuildwheel") is None:
        pytest.skip("cibuildwheel is not installed (the test extra has it on Python >= 3.11)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    out = subprocess.run(
        [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", platform],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    expected = {f"cp3{minor}-{tag}" for minor in (10, 11, 12, 13) for tag in tags}
    assert set(out.split()) == expected


def test_cibuildwheel_passes_the_backend_and_tests_the_import() -> None:
    cibw = _pyproject()["tool"]["cibuildwheel"]
    assert "LLAMABOX_BACKEND" in cibw["linux"]["environment-pass"]
    assert "import llamabox._core" in cibw["test-command"]
    assert cibw["linux"]["repair-wheel-command"].startswith("auditwheel repair")
    assert cibw["macos"]["repair-wheel-command"].startswith("delocate-wheel")
    assert "musllinux" in cibw["skip"]


def test_the_workflow_builds_backends_of_the_table_where_they_build() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["wheels"]
    matrix = job["strategy"]["matrix"]["include"]
    platform = {"ubuntu": "linux", "macos": "macos", "windows": "windows"}
    built = set()
    for entry in matrix:
        b = backends.get(entry["backend"])
        assert platform[entry["os"].split("-")[0]] in b.platforms, entry
        built.add(b.name)
    assert {"cpu", "cuda12", "vulkan", "metal"} <= built
    assert job["env"]["LLAMABOX_BACKEND"] == "${{ matrix.backend }}"
    steps = job["steps"]
    for name in built - {"cpu", "metal"}:  # a toolchain of its own
        assert any(name in str(s.get("if", "")) for s in steps), name
    # the action is the release the test extra installs: the matrix tested here is CI's
    [action] = [s["uses"] for s in steps if s.get("uses", "").startswith("pypa/cibuildwheel@")]
    test_extra = _pyproject()["project"]["optional-dependencies"]["test"]
    [req] = [r for r in test_extra if r.startswith("cibuildwheel")]
    assert action == "pypa/cibuildwheel@v" + re.search(r">=([\d.]+)", req)[1]  # type: ignore[index]


# ---- scripts/build_backend_wheel.sh ----


@pytest.mark.skipif(os.name == "nt", reason="a bash script")
def test_the_script_runs_pip_wheel_for_one_checked_backend(tmp_path: Path, clean_env: None) -> None:
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -m ]; then echo "$LLAMABOX_BACKEND $*" > {log}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    script = ROOT / "scripts" / "build_backend_wheel.sh"
    env = {**os.environ, "PYTHON": str(fake), "DIST": str(tmp_path / "dist")}
    run = subprocess.run(
        [script, "cuda12", "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=89"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "cuda12: wheel llamabox-cuda12" in run.stdout
    assert log.read_text().split() == [
        "cuda12", "-m", "pip", "wheel", ".", "--no-deps", "--wheel-dir", str(tmp_path / "dist"),
        "-Cllamabox.backend=cuda12", "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=89",
    ]  # fmt: skip
    bad = subprocess.run([script, "opencl"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown llamabox backend 'opencl'" in bad.stderr
    usage = subprocess.run([script], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr and "llamabox-vulkan" in usage.stderr


def test_the_version_comes_from_whichever_wheel_installed_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backend's wheel (llamabox-vulkan) installs the package under another distribution
    name: --version and the API's fingerprint must still find its version."""
    from importlib import metadata

    from llamabox._version import installed_version

    versions = {"llamabox-vulkan": "1.2.3"}

    def version(name: str) -> str:
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(
        metadata, "packages_distributions", lambda: {"llamabox": ["llamabox-vulkan"]}
    )
    monkeypatch.setattr(metadata, "version", version)
    assert installed_version() == "1.2.3"
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {})
    assert installed_version("x") == "x"
    versions["llamabox"] = "0.9"
    assert installed_version() == "0.9"
    monkeypatch.setattr(metadata, "packages_distributions", lambda: 1 / 0)  # never scanned then
    assert installed_version() == "0.9"


def test_a_cuda_wheel_requires_nvidias_runtime_wheels() -> None:
    """pip install llamabox-cuda13 brings cudart and cuBLAS (NVIDIA's PyPI wheels, which
    install under site-packages/nvidia/, where _core's RPATH points): only the driver is the
    machine's."""
    meta = b"Metadata-Version: 2.1\nName: llamabox\nVersion: 0.1.0\n"
    meta += b"Requires-Dist: numpy>=1.24\n\nbody\n"
    cuda13 = backends.get("cuda13")
    out = backends.rename_metadata(meta, cuda13.distribution, cuda13.requires).decode()
    head = out.partition("\n\n")[0].splitlines()
    assert "Requires-Dist: numpy>=1.24" in head
    assert "Requires-Dist: nvidia-cuda-runtime>=13.0,<14" in head
    assert "Requires-Dist: nvidia-cublas>=13.0,<14" in head
    assert out.endswith("\n\nbody\n")
    again = backends.rename_metadata(out.encode(), cuda13.distribution, cuda13.requires).decode()
    assert again.count("nvidia-cublas") == 1  # not added twice
    assert cuda13.rpath == ("$ORIGIN/../nvidia/cu13/lib",)
    for name, backend in backends.BACKENDS.items():
        assert bool(backend.requires) == bool(backend.rpath) == (backend.cuda_major is not None), (
            name
        )
