#!/usr/bin/env python3
"""Check that our sdist is complete and that installing from it would download nothing.

Usage: python scripts/check_sdist.py dist/llamabox-X.Y.Z.tar.gz

It checks that the sdist holds the pinned llama.cpp, our sources and pyproject.toml, and no build
outputs; then it unpacks the sdist and runs that copy's ``vendor/fetch.py --check`` offline, with
an empty download cache: it passes only if the sdist's llama.cpp tree matches the pin.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIRED = [
    "pyproject.toml",
    "CMakeLists.txt",
    "csrc/CMakeLists.txt",
    "python/llamabox/__init__.py",
    "vendor/fetch.py",
    "vendor/build_backend.py",
    "vendor/backends.py",
    "vendor/llama.cpp.pin",
    "vendor/llama.cpp/CMakeLists.txt",
]
# Tracked files under these must all be in the sdist.
SOURCES = ["csrc", "python/llamabox"]
FORBIDDEN = ["build/", "bench/build/", ".venv/", "venv/", "vendor/llama.cpp.tmp/", ".git/"]


def tracked_sources() -> list[str]:
    """Our tracked files under SOURCES, or [] where there is no git checkout to ask."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--", *SOURCES],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [p for p in out.decode().split("\0") if p]


def problems(names: Iterable[str]) -> list[str]:
    """What is wrong with an sdist whose members (below its top directory) are names."""
    have = set(names)
    found = []
    for path in REQUIRED:
        if path not in have:
            found.append(f"missing {path}")
    for path in tracked_sources():
        if path not in have:
            found.append(f"missing {path} (tracked by git)")
    for prefix in SOURCES:
        if not any(n.startswith(prefix + "/") for n in have):
            found.append(f"nothing under {prefix}/")
    for name in sorted(have):
        if any(name.startswith(bad) for bad in FORBIDDEN):
            found.append(f"should not hold {name}")
    return found


def members(tar: tarfile.TarFile) -> tuple[str, list[str]]:
    """(top directory, member names relative to it)."""
    names = [m.name for m in tar.getmembers() if not m.isdir()]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        raise SystemExit(f"expected one top directory in the sdist, found {sorted(tops)}")
    top = tops.pop()
    return top, [n.split("/", 1)[1] for n in names if "/" in n]


def check_fetch_offline(tar: tarfile.TarFile, top: str) -> int:
    """Unpack the sdist and run its fetch.py --check offline, with an empty cache."""
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Pythons before 3.10.12; the sdist is our own
            tar.extractall(tmp)
        cache = Path(tmp) / "empty-cache"
        cache.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "LLAMABOX_LLAMA_CPP_DIR"}
        env |= {"LLAMABOX_OFFLINE": "1", "LLAMABOX_CACHE_DIR": str(cache)}
        fetch = Path(tmp) / top / "vendor" / "fetch.py"
        return subprocess.run([sys.executable, str(fetch), "--check"], env=env).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sdist", type=Path)
    args = ap.parse_args()
    with tarfile.open(args.sdist) as tar:
        top, names = members(tar)
        found = problems(names)
        for p in found:
            print(f"check_sdist: {args.sdist.name}: {p}", file=sys.stderr)
        if found:
            return 1
        if check_fetch_offline(tar, top) != 0:
            print(f"check_sdist: {args.sdist.name}: its llama.cpp does not verify", file=sys.stderr)
            return 1
    llama = sum(1 for n in names if n.startswith("vendor/llama.cpp/"))
    size = args.sdist.stat().st_size / 1e6
    print(f"check_sdist: {args.sdist.name} ok: {len(names)} files ({llama} of llama.cpp), "
          f"{size:.1f} MB, llama.cpp verifies offline")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
