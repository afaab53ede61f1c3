"""The build backend: scikit-build-core's, with an sdist that carries the pinned llama.cpp.

pyproject.toml names this module (``backend-path = ["vendor"]``). Every PEP 517/660 hook is
scikit-build-core's own; ``build_sdist`` first runs fetch.py's logic, so that vendor/llama.cpp is
the pinned, verified tree (downloaded if it is not there) when ``sdist.include`` packs it.
Installing from that sdist then downloads nothing: its tree verifies.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from scikit_build_core import build as _skbuild
from scikit_build_core.build import (
    build_editable,
    build_wheel,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
]

# scikit-build-core defines these two only when the metadata is known without a build; a
# frontend falls back to build_wheel without them, so we must not define them either.
if hasattr(_skbuild, "prepare_metadata_for_build_wheel"):
    prepare_metadata_for_build_wheel = _skbuild.prepare_metadata_for_build_wheel
    __all__ += ["prepare_metadata_for_build_wheel"]
if hasattr(_skbuild, "prepare_metadata_for_build_editable"):
    prepare_metadata_for_build_editable = _skbuild.prepare_metadata_for_build_editable
    __all__ += ["prepare_metadata_for_build_editable"]


def _load_fetch() -> ModuleType:
    # By path, under a name of our own: a plain `import fetch` could find some other "fetch".
    path = Path(__file__).with_name("fetch.py")
    spec = importlib.util.spec_from_file_location("_llamabox_vendor_fetch", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def build_sdist(
    sdist_directory: str, config_settings: dict[str, list[str] | str] | None = None
) -> str:
    # Always the pinned tree, even with LLAMABOX_LLAMA_CPP_DIR set: that only says what a
    # local build compiles, and the sdist must build the same everywhere.
    rc = _load_fetch().main([])
    if rc != 0:
        raise SystemExit(rc)  # fetch.py has said why; a traceback would only hide it
    sdist: str = _skbuild.build_sdist(sdist_directory, config_settings)
    return sdist
