"""vendor/*.py loaded by path, the way vendor/build_backend.py loads them, for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

VENDOR = Path(__file__).resolve().parents[2] / "vendor"


def load_vendor(filename: str, name: str | None = None) -> ModuleType:
    """vendor/FILENAME as a module of its own name (not importable by accident elsewhere)."""
    name = name or f"_llamabox_vendor_{Path(filename).stem}_under_test"
    spec = importlib.util.spec_from_file_location(name, VENDOR / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
