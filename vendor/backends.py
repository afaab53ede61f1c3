#!/usr/bin/env python3
"""The ggml backends llamabox builds: one table, and what a backend build changes.

A backend is chosen with ``LLAMABOX_BACKEND=<name>`` or the config setting
``-Cllamabox.backend=<name>`` (the config setting wins). build_backend.py then

- adds the backend's CMake defines to the config settings it hands to scikit-build-core, except
  those the user set explicitly (``-Ccmake.define.X``, ``cmake.args``, ``CMAKE_ARGS``, ...), and
  ``-DLLAMABOX_BACKEND=<name>``, which csrc/CMakeLists.txt compiles into ``_core``;
- builds in ``build/{wheel_tag}_<name>``, so that backends never share a CMake cache (the
  ``_`` sorts after ``build/{wheel_tag}/``, which scripts/dev-build.sh takes as the first);
- names the wheel ``llamabox`` for cpu and ``llamabox-<name>`` otherwise. PEP 621 forbids a
  dynamic ``name``, so the wheel scikit-build-core built is rewritten: the ``.dist-info``
  directory renamed, ``Name:`` set in METADATA (with ``Provides-Dist: llamabox``), RECORD
  rewritten with fresh hashes, the file renamed. The import package is ``llamabox`` in all of
  them, so they install the same files: one backend's wheel per environment.

Nothing chosen: a local build for this machine, as before (ggml's defaults, GGML_NATIVE=ON,
the name ``llamabox``, the build directory ``build/{wheel_tag}``), except under cibuildwheel
(``CIBUILDWHEEL=1``), where it means cpu.

This module is plain standard library: build_backend.py loads it by path, the tests import it,
and ``python vendor/backends.py --markdown`` prints the table docs/backends.md carries.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "LLAMABOX_BACKEND"
CONFIG_KEY = "llamabox.backend"
DEFAULT = "cpu"
PROJECT = "llamabox"
# What an unselected build records when it is not plain CPU (raw -Ccmake.define.GGML_CUDA=ON,
# or macOS, where ggml turns Metal on by default): not one of the table's builds.
CUSTOM = "custom"

ConfigSettings = dict[str, "str | list[str]"]


class BackendError(Exception):
    """A wrong choice or toolchain the user can act on: the hooks print it, no traceback."""


@dataclass(frozen=True)
class Backend:
    name: str
    title: str
    # Set for a portable wheel; the first is the switch that turns the backend on.
    defines: dict[str, str]
    toolchain: str
    platforms: tuple[str, ...]
    # CMake variables a builder may set for this backend (GPU architecture lists, compilers).
    knobs: tuple[str, ...] = ()
    # The CUDA toolkit major version the wheel is for: checked against nvcc before building.
    cuda_major: int | None = None
    # Runtime libraries from PyPI: the wheel requires them (Requires-Dist) and _core finds them
    # through these RPATH entries, relative to its own directory, before the system's.
    requires: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()

    @property
    def switch(self) -> str | None:
        """The define that turns the backend on: the first one, except for cpu (none)."""
        first = next(iter(self.defines))
        return None if self.name == DEFAULT else first

    @property
    def distribution(self) -> str:
        return PROJECT if self.name == DEFAULT else f"{PROJECT}-{self.name}"


_CUDA_TOOLCHAIN = (
    "CUDA Toolkit {major}.x ({gpus}): nvcc, cudart, cuBLAS; a host compiler it supports"
)

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "cpu",
            "CPU",
            {
                "GGML_NATIVE": "OFF",
                "GGML_METAL": "OFF",
                "GGML_BACKEND_DL": "ON",
                "GGML_CPU_ALL_VARIANTS": "ON",
            },
            "a C++17 compiler (GCC, Clang, MSVC 2022), CMake >= 3.21",
            ("linux", "macos", "windows"),
            knobs=("GGML_CPU_ALL_VARIANTS", "GGML_BACKEND_DL", "GGML_AVX2", "GGML_CPU_ARM_ARCH"),
        ),
        Backend(
            "cuda12",
            "NVIDIA CUDA 12",
            {"GGML_CUDA": "ON", "GGML_NATIVE": "OFF", "GGML_CUDA_NCCL": "OFF"},
            _CUDA_TOOLCHAIN.format(major=12, gpus="12.8+ for Blackwell"),
            ("linux", "windows"),
            knobs=("CMAKE_CUDA_ARCHITECTURES", "CMAKE_CUDA_COMPILER"),
            cuda_major=12,
            requires=("nvidia-cuda-runtime-cu12>=12.8,<13", "nvidia-cublas-cu12>=12.8,<13"),
            rpath=("$ORIGIN/../nvidia/cuda_runtime/lib", "$ORIGIN/../nvidia/cublas/lib"),
        ),
        Backend(
            "cuda13",
            "NVIDIA CUDA 13",
            {"GGML_CUDA": "ON", "GGML_NATIVE": "OFF", "GGML_CUDA_NCCL": "OFF"},
            _CUDA_TOOLCHAIN.format(major=13, gpus="Turing and newer GPUs"),
            ("linux", "windows"),
            knobs=("CMAKE_CUDA_ARCHITECTURES", "CMAKE_CUDA_COMPILER"),
            cuda_major=13,
            requires=("nvidia-cuda-runtime>=13.0,<14", "nvidia-cublas>=13.0,<14"),
            rpath=("$ORIGIN/../nvidia/cu13/lib",),
        ),
        Backend(
            "rocm",
            "AMD ROCm (HIP)",
            {"GGML_HIP": "ON", "GGML_NATIVE": "OFF"},
            "ROCm >= 6.1 (HIP, hipBLAS, rocBLAS) with its clang as the HIP compiler",
            ("linux",),
            knobs=("GPU_TARGETS", "AMDGPU_TARGETS"),
        ),
        Backend(
            "sycl",
            "Intel oneAPI SYCL",
            {
                "GGML_SYCL": "ON",
                "GGML_NATIVE": "OFF",
                "CMAKE_C_COMPILER": "icx",
                "CMAKE_CXX_COMPILER": "icpx",
            },
            "Intel oneAPI Base Toolkit >= 2025.0 (icx/icpx, oneMKL, oneDNN), setvars.sh sourced",
            ("linux",),
            knobs=("GGML_SYCL_TARGET", "GGML_SYCL_DEVICE_ARCH", "GGML_SYCL_F16"),
        ),
        Backend(
            "metal",
            "Apple Metal",
            {"GGML_METAL": "ON", "GGML_NATIVE": "OFF", "GGML_METAL_EMBED_LIBRARY": "ON"},
            "Xcode or its command line tools (Apple clang, the Metal framework), Apple silicon",
            ("macos",),
            knobs=("CMAKE_OSX_DEPLOYMENT_TARGET",),
        ),
        Backend(
            "cann",
            "Huawei Ascend CANN",
            {"GGML_CANN": "ON", "GGML_NATIVE": "OFF"},
            "Ascend CANN toolkit 8.x with its set_env.sh sourced (ASCEND_TOOLKIT_HOME)",
            ("linux",),
            knobs=("SOC_TYPE", "USE_ACL_GRAPH"),
        ),
        Backend(
            "musa",
            "Moore Threads MUSA",
            {"GGML_MUSA": "ON", "GGML_NATIVE": "OFF"},
            "Moore Threads MUSA SDK (its clang) at MUSA_PATH, /opt/musa or /usr/local/musa",
            ("linux",),
            knobs=("MUSA_ARCHITECTURES",),
        ),
        Backend(
            "vulkan",
            "Vulkan",
            {"GGML_VULKAN": "ON", "GGML_NATIVE": "OFF", "GGML_METAL": "OFF"},
            "Vulkan headers and loader, glslc (shaderc), SPIRV-Headers; or the LunarG SDK",
            ("linux", "windows"),
            knobs=("Vulkan_GLSLC_EXECUTABLE",),
        ),
    )
}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name.strip().lower()]
    except KeyError:
        raise BackendError(
            f"unknown llamabox backend {name!r}; one of: {', '.join(BACKENDS)}"
        ) from None


# Reading the config settings and the environment.


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def selected(
    config_settings: Mapping[str, str | list[str]] | None, environ: Mapping[str, str]
) -> Backend | None:
    """The backend asked for, by the config setting or else the environment; None if neither."""
    values = _as_list((config_settings or {}).get(CONFIG_KEY))
    value = values[-1] if values else environ.get(ENV_VAR, "")
    if not value.strip() and environ.get("CIBUILDWHEEL") == "1":
        value = DEFAULT  # a wheel cibuildwheel builds is for others' machines: never native
    return get(value) if value.strip() else None


def _defines_in_args(args: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    items = iter(args)
    for arg in items:
        if arg == "-D":
            arg = "-D" + next(items, "")
        if arg.startswith("-D") and "=" in arg:
            name, _, value = arg[2:].partition("=")
            found[name.partition(":")[0].strip()] = value
    return found


def explicit_defines(
    config_settings: Mapping[str, str | list[str]] | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """CMake variables the user set, by every way scikit-build-core takes them."""
    found: dict[str, str] = {}
    try:
        found.update(_defines_in_args(shlex.split(environ.get("CMAKE_ARGS", ""))))
    except ValueError as e:
        raise BackendError(f"CMAKE_ARGS cannot be split as a shell would: {e}") from None
    found.update(_defines_in_args(environ.get("SKBUILD_CMAKE_ARGS", "").split(";")))
    for item in environ.get("SKBUILD_CMAKE_DEFINE", "").split(";"):
        name, sep, value = item.partition("=")
        if sep:
            found[name.partition(":")[0].strip()] = value
    for raw_key, setting in (config_settings or {}).items():
        key = raw_key.removeprefix("skbuild.")
        if key.startswith("cmake.define."):
            values = _as_list(setting)
            found[key.removeprefix("cmake.define.")] = values[-1] if values else ""
        elif key == "cmake.args":
            args = [a for v in _as_list(setting) for a in v.split(";")]
            found.update(_defines_in_args(args))
    return found


def _has_key(config_settings: Mapping[str, object], key: str) -> bool:
    return key in config_settings or f"skbuild.{key}" in config_settings


def _is_on(value: str) -> bool:
    # CMake's true constants; anything else (OFF, 0, NO, FALSE, "") is false for our purpose.
    return value.strip().upper() in {"1", "ON", "YES", "TRUE", "Y"} or (
        value.strip().isdigit() and int(value) != 0
    )


def recorded_name(
    backend: Backend | None, explicit: Mapping[str, str], platform: str = sys.platform
) -> str:
    """The name compiled into _core: the backend chosen, else cpu or custom (see CUSTOM)."""
    if backend is not None:
        return backend.name
    switches = {b.switch for b in BACKENDS.values() if b.switch}
    if platform == "darwin" and not (
        "GGML_METAL" in explicit and not _is_on(explicit["GGML_METAL"])
    ):
        return CUSTOM  # ggml's default there is Metal on
    if any(_is_on(explicit[s]) for s in switches if s in explicit):
        return CUSTOM
    return DEFAULT


@dataclass
class Plan:
    """What one build does: the config settings for scikit-build-core, and the wheel's name."""

    config_settings: ConfigSettings
    backend: Backend | None
    recorded: str
    explicit: dict[str, str]  # what the user defined, which the table never overrides
    added: dict[str, str]  # what the table added

    @property
    def distribution(self) -> str:
        return self.backend.distribution if self.backend else PROJECT

    @property
    def renames(self) -> bool:
        return self.distribution != PROJECT

    @property
    def requires(self) -> tuple[str, ...]:
        """The backend's runtime libraries, for the wheel's Requires-Dist."""
        return self.backend.requires if self.backend else ()


def plan(
    config_settings: Mapping[str, str | list[str]] | None,
    environ: Mapping[str, str],
    platform: str = sys.platform,
) -> Plan:
    """The config settings scikit-build-core gets: ours removed, the backend's defines added."""
    unknown = [k for k in config_settings or {} if k.startswith("llamabox.") and k != CONFIG_KEY]
    if unknown:
        raise BackendError(f"unknown config setting {unknown[0]}; llamabox has {CONFIG_KEY}")
    backend = selected(config_settings, environ)
    explicit = explicit_defines(config_settings, environ)
    out: ConfigSettings = {
        k: v for k, v in (config_settings or {}).items() if not k.startswith("llamabox.")
    }
    wanted = dict(backend.defines) if backend else {}
    if backend and backend.switch in explicit and not _is_on(explicit[backend.switch]):
        raise BackendError(
            f"backend {backend.name} is {backend.switch}=ON, and the build was also given "
            f"{backend.switch}={explicit[backend.switch]}: drop one of them"
        )
    recorded = recorded_name(backend, explicit, platform)
    wanted["LLAMABOX_BACKEND"] = recorded
    if backend and backend.rpath and platform.startswith("linux"):
        wanted["LLAMABOX_RPATH"] = ";".join(backend.rpath)
    added = {}
    for name, value in wanted.items():
        if name not in explicit:
            out[f"cmake.define.{name}"] = value
            added[name] = value
    if backend and not _has_key(out, "build-dir") and "SKBUILD_BUILD_DIR" not in environ:
        out["build-dir"] = f"build/{{wheel_tag}}_{backend.name}"
    return Plan(out, backend, recorded, explicit, added)


def describe(p: Plan) -> str:
    if p.backend is None:
        return f"llamabox: no backend chosen ({ENV_VAR} unset): a local build ({p.recorded})"
    defines = " ".join(f"-D{k}={v}" for k, v in p.added.items())
    return f"llamabox: backend {p.backend.name} ({defines}), wheel {p.distribution}"


# The CUDA toolkit a cuda<N> wheel is built with.


def find_nvcc(explicit: Mapping[str, str], environ: Mapping[str, str]) -> str | None:
    """The nvcc CMake would use, looked up in the order FindCUDAToolkit documents."""
    for candidate in (explicit.get("CMAKE_CUDA_COMPILER"), environ.get("CUDACXX")):
        if candidate:
            return candidate
    roots = [explicit.get("CUDAToolkit_ROOT"), environ.get("CUDAToolkit_ROOT")]
    for root in roots:
        if root:
            found = shutil.which("nvcc", path=os.path.join(root, "bin"))
            if found:
                return found
    if environ.get("CUDA_PATH"):
        found = shutil.which("nvcc", path=os.path.join(environ["CUDA_PATH"], "bin"))
        if found:
            return found
    return shutil.which("nvcc", path=environ.get("PATH")) or shutil.which(
        "nvcc", path="/usr/local/cuda/bin"
    )


def nvcc_version(nvcc: str) -> tuple[int, int]:
    try:
        out = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendError(f"cannot run {nvcc} --version: {e}") from None
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise BackendError(f"{nvcc} --version does not say its release:\n{out}")
    return int(match[1]), int(match[2])


def check_toolchain(p: Plan, environ: Mapping[str, str]) -> None:
    """A cuda<N> wheel needs CUDA N: refuse another nvcc, and pin CMake to the one checked."""
    backend = p.backend
    if backend is None or backend.cuda_major is None:
        return
    nvcc = find_nvcc(p.explicit, environ)
    if nvcc is None:
        raise BackendError(
            f"backend {backend.name} needs CUDA {backend.cuda_major}, and no nvcc was found "
            "(CMAKE_CUDA_COMPILER, CUDACXX, CUDAToolkit_ROOT, CUDA_PATH, PATH, "
            "/usr/local/cuda/bin). Install the toolkit or pass "
            "-Ccmake.define.CMAKE_CUDA_COMPILER=/path/to/bin/nvcc"
        )
    major, minor = nvcc_version(nvcc)
    if major != backend.cuda_major:
        raise BackendError(
            f"backend {backend.name} needs CUDA {backend.cuda_major}, and {nvcc} is CUDA "
            f"{major}.{minor}. Point -Ccmake.define.CMAKE_CUDA_COMPILER at a CUDA "
            f"{backend.cuda_major} nvcc, or choose LLAMABOX_BACKEND=cuda{major}"
        )
    if "CMAKE_CUDA_COMPILER" not in p.explicit:
        p.config_settings["cmake.define.CMAKE_CUDA_COMPILER"] = nvcc
        p.added["CMAKE_CUDA_COMPILER"] = nvcc


# Renaming a wheel (PEP 427 / the binary distribution format) or a prepared .dist-info.


def escape(name: str) -> str:
    """A distribution name as wheel file names and .dist-info directories spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode('ascii')}"


def rename_metadata(metadata: bytes, name: str, requires: Sequence[str] = ()) -> bytes:
    """METADATA with ``Name: name``, ``Provides-Dist`` for the project it stands in for, and
    ``Requires-Dist`` for each of ``requires`` (the backend's runtime libraries)."""
    text = metadata.decode("utf-8")
    head, sep, body = text.partition("\n\n")
    lines = head.split("\n")
    names = [i for i, line in enumerate(lines) if line.lower().startswith("name:")]
    if len(names) != 1:
        raise BackendError(f"METADATA has {len(names)} Name fields, expected 1")
    old = lines[names[0]].partition(":")[2].strip()
    lines[names[0]] = f"Name: {name}"
    for i, line in enumerate(lines):
        # Self-references (``dev = ["llamabox[test]"]``) must name this wheel, or an extra
        # would pull in the cpu wheel over it.
        field, _, req = line.partition(":")
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if field.lower() == "requires-dist" and match and escape(match[1]) == escape(old):
            lines[i] = f"{field}: {name}{req[match.end() :]}"
    version = next(
        (ln.partition(":")[2].strip() for ln in lines if ln.lower().startswith("version:")), ""
    )
    if old != name:
        lines.append(f"Provides-Dist: {old} ({version})" if version else f"Provides-Dist: {old}")
    present = {
        ln.partition(":")[2].strip() for ln in lines if ln.lower().startswith("requires-dist:")
    }
    lines += [f"Requires-Dist: {req}" for req in requires if req not in present]
    return ("\n".join(lines) + (sep or "\n") + body).encode("utf-8")


def _split_wheel_name(filename: str) -> tuple[str, str]:
    if not filename.endswith(".whl") or filename.count("-") < 4:
        raise BackendError(f"not a wheel file name: {filename}")
    dist, _, rest = filename.partition("-")
    return dist, rest


def rename_wheel(wheel: Path, name: str, requires: Sequence[str] = ()) -> Path:
    """Rewrite wheel as distribution ``name`` (with ``requires`` added to its dependencies);
    returns the new file (the old one is removed)."""
    old_dist, rest = _split_wheel_name(wheel.name)
    version = rest.split("-")[0]
    new_dist = escape(name)
    old_prefixes = (f"{old_dist}-{version}.dist-info/", f"{old_dist}-{version}.data/")
    new_prefixes = (f"{new_dist}-{version}.dist-info/", f"{new_dist}-{version}.data/")
    record_path = f"{new_prefixes[0]}RECORD"
    target = wheel.with_name(f"{new_dist}-{rest}")
    fd, tmp = tempfile.mkstemp(dir=wheel.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
            if f"{old_prefixes[0]}METADATA" not in src.namelist():
                raise BackendError(f"{wheel.name} has no {old_prefixes[0]}METADATA")
            record = []
            for info in src.infolist():
                path = info.filename
                for old, new in zip(old_prefixes, new_prefixes, strict=True):
                    if path.startswith(old):
                        path = new + path[len(old) :]
                if path == record_path or path.endswith(("/RECORD.jws", "/RECORD.p7s")):
                    continue  # written below; a signature of the old RECORD no longer holds
                data = src.read(info)
                if path == f"{new_prefixes[0]}METADATA":
                    data = rename_metadata(data, name, requires)
                out = zipfile.ZipInfo(path, info.date_time)
                out.external_attr = info.external_attr
                out.compress_type = info.compress_type
                out.create_system = info.create_system
                dst.writestr(out, data)
                if not path.endswith("/"):
                    record.append(f"{_csv(path)},{_record_hash(data)},{len(data)}\n")
            record.append(f"{_csv(record_path)},,\n")
            info = zipfile.ZipInfo(record_path, (1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, "".join(record))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if target != wheel:
        wheel.unlink()
    return target


def _csv(path: str) -> str:
    # RECORD is CSV: quote a path that holds a comma or a quote.
    return '"' + path.replace('"', '""') + '"' if any(c in path for c in ',"\n') else path


def rename_dist_info(
    metadata_directory: str, dist_info: str, name: str, requires: Sequence[str] = ()
) -> str:
    """Rename a prepared ``<name>-<version>.dist-info``; returns the new directory's name."""
    old = Path(metadata_directory) / dist_info
    version = dist_info.removesuffix(".dist-info").partition("-")[2]
    new = old.with_name(f"{escape(name)}-{version}.dist-info")
    metadata = old / "METADATA"
    metadata.write_bytes(rename_metadata(metadata.read_bytes(), name, requires))
    if new != old:
        os.rename(old, new)
    return new.name


# The table as docs/backends.md carries it.


def markdown_table() -> str:
    rows = [
        "| Backend | `LLAMABOX_BACKEND` | Wheel | CMake defines | Toolchain | Builds on |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in BACKENDS.values():
        defines = " ".join(f"`{k}={v}`" for k, v in b.defines.items())
        rows.append(
            f"| {b.title} | `{b.name}` | `{b.distribution}` | {defines} | {b.toolchain} | "
            f"{', '.join(b.platforms)} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The ggml backends llamabox builds.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="print docs/backends.md's table")
    mode.add_argument("--check", metavar="NAME", help="exit 1 unless NAME is a backend")
    args = ap.parse_args(argv)
    if args.check is not None:
        try:
            b = get(args.check)
        except BackendError as e:
            print(f"llamabox: {e}", file=sys.stderr)
            return 1
        print(f"{b.name}: wheel {b.distribution}; needs {b.toolchain}")
        return 0
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    for b in BACKENDS.values():
        print(
            f"{b.name:8} {b.distribution:16} {' '.join(f'{k}={v}' for k, v in b.defines.items())}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
