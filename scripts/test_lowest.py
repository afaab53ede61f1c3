#!/usr/bin/env python3
"""Run the test suite with the lowest releases pyproject.toml allows.

    python scripts/test_lowest.py [VENV] [-- pytest args]

Every ``name>=X`` of ``[project] dependencies`` and of the ``test`` extra becomes ``name==X``
(markers kept), installed into a fresh virtual environment (default ``.venv-lowest``). llamabox
itself is not built again: this interpreter's installed ``llamabox._core`` (run it from the
environment llamabox is installed in) goes with a copy of ``python/llamabox`` onto PYTHONPATH.
Then ``python -m pytest``. The lower bounds in pyproject.toml are the releases this passes
with: raise one when a test needs a newer release, never guess.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOWER = re.compile(r"^(?P<name>[A-Za-z0-9_.\-\[\]]+)\s*>=\s*(?P<version>[^,;\s]+)(?P<rest>.*)$")


def lowest(requirements: list[str]) -> list[str]:
    """``name>=X[; marker]`` as ``name==X[; marker]``; anything else as it is."""
    out = []
    for req in requirements:
        match = LOWER.match(req.strip())
        if match and "," not in match.group("rest").split(";")[0]:
            out.append(f"{match['name']}=={match['version']}{match['rest']}")
        elif not req.startswith("llamabox"):
            out.append(req)
    return out


def main(argv: list[str]) -> int:
    args, pytest_args = (
        (argv, [])
        if "--" not in argv
        else (
            argv[: argv.index("--")],
            argv[argv.index("--") + 1 :],
        )
    )
    env_dir = Path(args[0]) if args else ROOT / ".venv-lowest"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = lowest(
        project["project"]["dependencies"] + project["project"]["optional-dependencies"]["test"]
    )
    print("lowest releases:", " ".join(reqs), flush=True)
    venv.create(env_dir, with_pip=True, clear=True)
    python = str(env_dir / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *reqs], check=True)

    from llamabox import _core  # the module built for this checkout

    with tempfile.TemporaryDirectory(prefix="llamabox-lowest-") as tmp:
        package = Path(tmp) / "llamabox"
        shutil.copytree(ROOT / "python" / "llamabox", package)
        shutil.copy2(_core.__file__, package)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, str(ROOT)])}
        return subprocess.run([python, "-m", "pytest", *pytest_args], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
