#!/usr/bin/env bash
# Builds one backend's wheel into dist/ (vendor/backends.py; docs/backends.md per backend):
#
#   scripts/build_backend_wheel.sh BACKEND [pip wheel arguments, e.g. -Ccmake.define.X=Y]
#   scripts/build_backend_wheel.sh cuda12 -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=89
#
# DIST=dir puts the wheel elsewhere; PYTHON=python picks the interpreter (default python3).
# The wheel is llamabox for cpu and llamabox-BACKEND otherwise, built with pip's build isolation
# in build/<wheel tag>_BACKEND (kept between runs). It is not repaired: auditwheel, delocate or
# delvewheel make it installable elsewhere (cibuildwheel does that; see pyproject.toml). Takes
# minutes for cpu, an hour or more for CUDA's default list of GPU architectures.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 BACKEND [pip wheel arguments]" >&2
    "$python" vendor/backends.py >&2
    exit 2
fi
backend=$1
shift
"$python" vendor/backends.py --check "$backend"

dist=${DIST:-dist}
mkdir -p "$dist"
before=$(mktemp)
trap 'rm -f "$before"' EXIT
ls "$dist" >"$before"
# LLAMABOX_BACKEND too, so that nothing in the environment says otherwise.
LLAMABOX_BACKEND=$backend "$python" -m pip wheel . --no-deps --wheel-dir "$dist" \
    "-Cllamabox.backend=$backend" "$@"
echo "built:"
ls "$dist" | grep -vxF -f "$before" | sed "s|^|  $dist/|" || echo "  (no new file in $dist)"
