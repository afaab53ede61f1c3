#!/usr/bin/env bash
# Rebuilds llamabox._core incrementally after `pip install --no-build-isolation -e .` and puts
# it where the editable install imports it from (faster than running pip again).
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(ls -d build/*/ | head -n 1)
cmake --build "$build" --target _core -j "${JOBS:-2}"
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
install -m 755 "$build"/csrc/_core*.so "$site/llamabox/"
echo "installed $(ls "$build"/csrc/_core*.so) into $site/llamabox/"
