"""The build backend: scikit-build-core's, with an sdist that carries the pinned llama.cpp, and
per-backend wheels.

pyproject.toml names this module (``backend-path = ["vendor"]``). Every PEP 517/660 hook is
scikit-build-core's own, wrapped:

- ``build_sdist`` first runs fetch.py's logic, so that vendor/llama.cpp is the pinned, verified
  tree (downloaded if it is not there) when ``sdist.include`` packs it. Installing from that
  sdist then downloads nothing: its tree verifies.
- the wheel hooks read the backend (``LLAMABOX_BACKEND`` or ``-Cllamabox.backend``) through
  backends.py, which says what that changes: CMake defines, the build directory, the wheel's
  distribution name (``llamabox-<backend>``; the wheel scikit-build-core wrote is renamed).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from scikit_build_core import build as _skbuild

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
]

ConfigSettings = dict[str, "list[str] | str"]


def _load(stem: str) -> ModuleType:
    # By path, under a name of our own: a plain `import fetch` could find some other "fetch".
    path = Path(__file__).with_name(f"{stem}.py")
    spec = importlib.util.spec_from_file_location(f"_llamabox_vendor_{stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _load_fetch() -> ModuleType:
    return _load("fetch")


_backends = _load("backends")


def _plan(config_settings: ConfigSettings | None, *, toolchain: bool = False) -> Any:
    """backends.plan() for this build; its BackendError ends the build with just the message."""
    try:
        plan = _backends.plan(config_settings, os.environ)
        if toolchain:
            _backends.check_toolchain(plan, os.environ)
    except _backends.BackendError as e:
        print(f"llamabox: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(_backends.describe(plan), file=sys.stderr, flush=True)
    return plan


def _build(
    hook: str,
    wheel_directory: str,
    config_settings: ConfigSettings | None,
    metadata_directory: str | None,
) -> str:
    plan = _plan(config_settings, toolchain=True)
    if plan.renames:
        # scikit-build-core compares a prepared .dist-info with its own, whose Name differs.
        metadata_directory = None
    built: str = getattr(_skbuild, hook)(
        wheel_directory,
        plan.config_settings,
        metadata_directory,
    )
    if not plan.renames:
        return built
    renamed: Path = _backends.rename_wheel(
        Path(wheel_directory) / built, plan.distribution, plan.requires
    )
    return renamed.name


def build_wheel(
    wheel_directory: str,
    config_settings: ConfigSettings | None = None,
    metadata_directory: str | None = None,
) -> str:
    return _build("build_wheel", wheel_directory, config_settings, metadata_directory)


def build_editable(
    wheel_directory: str,
    config_settings: ConfigSettings | None = None,
    metadata_directory: str | None = None,
) -> str:
    return _build("build_editable", wheel_directory, config_settings, metadata_directory)


def _prepare(hook: str, metadata_directory: str, config_settings: ConfigSettings | None) -> str:
    plan = _plan(config_settings)
    dist_info: str = getattr(_skbuild, hook)(metadata_directory, plan.config_settings)
    if plan.renames:
        dist_info = _backends.rename_dist_info(
            metadata_directory, dist_info, plan.distribution, plan.requires
        )
    return dist_info


# scikit-build-core defines these two only when the metadata is known without a build; a
# frontend falls back to build_wheel without them, so we must not define them either.
if hasattr(_skbuild, "prepare_metadata_for_build_wheel"):

    def prepare_metadata_for_build_wheel(
        metadata_directory: str, config_settings: ConfigSettings | None = None
    ) -> str:
        return _prepare("prepare_metadata_for_build_wheel", metadata_directory, config_settings)

    __all__ += ["prepare_metadata_for_build_wheel"]

if hasattr(_skbuild, "prepare_metadata_for_build_editable"):

    def prepare_metadata_for_build_editable(
        metadata_directory: str, config_settings: ConfigSettings | None = None
    ) -> str:
        return _prepare("prepare_metadata_for_build_editable", metadata_directory, config_settings)

    __all__ += ["prepare_metadata_for_build_editable"]


def get_requires_for_build_wheel(config_settings: ConfigSettings | None = None) -> list[str]:
    settings = _plan(config_settings).config_settings
    requires: list[str] = _skbuild.get_requires_for_build_wheel(settings)
    return requires


def get_requires_for_build_editable(config_settings: ConfigSettings | None = None) -> list[str]:
    settings = _plan(config_settings).config_settings
    requires: list[str] = _skbuild.get_requires_for_build_editable(settings)
    return requires


def _without_ours(config_settings: ConfigSettings | None) -> ConfigSettings:
    # An sdist is the same for every backend: our settings only have to stay away from
    # scikit-build-core, which refuses keys it does not know.
    return {k: v for k, v in (config_settings or {}).items() if not k.startswith("llamabox.")}


def get_requires_for_build_sdist(config_settings: ConfigSettings | None = None) -> list[str]:
    requires: list[str] = _skbuild.get_requires_for_build_sdist(_without_ours(config_settings))
    return requires


def build_sdist(sdist_directory: str, config_settings: ConfigSettings | None = None) -> str:
    # Always the pinned tree, even with LLAMABOX_LLAMA_CPP_DIR set: that only says what a
    # local build compiles, and the sdist must build the same everywhere.
    rc = _load_fetch().main([])
    if rc != 0:
        raise SystemExit(rc)  # fetch.py has said why; a traceback would only hide it
    sdist: str = _skbuild.build_sdist(sdist_directory, _without_ours(config_settings))
    return sdist
