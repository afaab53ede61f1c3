#!/usr/bin/env bash
# Compiles and links the cuda13 wheel for one GPU architecture on a machine without a GPU
# (docs/backends.md, "What was built where"):
#
#   scripts/check_cuda_build.sh [ARCH]        # ARCH: CMAKE_CUDA_ARCHITECTURES, default 89
#
# Needs nvcc 13 (CUDACXX, or on PATH) and the network once, for NVIDIA's cuBLAS wheel from PyPI
# (nvidia-cublas 13.0.x: headers and libcublas.so.13), which a toolkit installed from NVIDIA's
# pip wheels, like this machine's, lacks. Such a toolkit has no driver stub either
# (lib/stubs/libcuda.so, which the linker needs for the driver API that ggml's VMM pool uses): a
# stub with the driver's soname is made here; the driver provides the symbols at run time.
# Then checks the module: linked to libcudart.so.13 and libcublas.so.13, with
# ggml's CUDA backend inside and this build's CUDA kernels (cuobjdump lists them per arch).
# Then installs it into a fresh venv: pip brings NVIDIA's cudart and cuBLAS wheels, and ldd
# resolves them from there through _core's RPATH. It cannot import here (no libcuda.so.1
# without a driver). The first build takes about half an hour on 2 cores for one architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-89}
python=${PYTHON:-python}
nvcc=${CUDACXX:-$(command -v nvcc)}
toolkit=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
work=${WORK:-build/cuda-deps}
mkdir -p "$work"
work=$(cd "$work" && pwd)

if [ ! -f "$work/cublas/include/cublas_v2.h" ]; then
    "$python" -m pip download -q --no-deps "nvidia-cublas==13.0.*" -d "$work/dl"
    rm -rf "$work/unpacked" && mkdir -p "$work/unpacked"
    "$python" -m zipfile -e "$work"/dl/nvidia_cublas-*.whl "$work/unpacked"
    root=$(dirname "$(find "$work/unpacked" -name cublas_v2.h | head -n 1)")/..
    rm -rf "$work/cublas" && mkdir -p "$work/cublas"
    cp -r "$root/include" "$root/lib" "$work/cublas/"
fi
cublas=$work/cublas
if [ ! -f "$work/stubs/libcuda.so" ]; then
    mkdir -p "$work/stubs"
    echo 'void llamabox_cuda_driver_stub(void) {}' >"$work/stubs/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/stubs/libcuda.so" "$work/stubs/stub.c"
fi
echo "toolkit $toolkit ($("$nvcc" --version | tail -n 1)); cuBLAS from $cublas; arch $arch"

dist=${DIST:-dist/cuda}
build_wheel() {
    rm -f "$dist"/llamabox_cuda13-*.whl
    DIST=$dist PYTHON=$python CUDACXX=$nvcc scripts/build_backend_wheel.sh cuda13 \
        "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$arch" \
        "-Ccmake.define.CMAKE_CUDA_COMPILER=$nvcc" \
        "-Ccmake.define.CUDA_cublas_LIBRARY=$cublas/lib/libcublas.so.13" \
        "-Ccmake.define.CUDA_cublasLt_LIBRARY=$cublas/lib/libcublasLt.so.13" \
        "-Ccmake.define.CUDA_cuda_driver_LIBRARY=$work/stubs/libcuda.so" \
        "-Ccmake.define.CMAKE_CUDA_FLAGS=-isystem $cublas/include" \
        "-Ccmake.define.CMAKE_CXX_FLAGS=-isystem $cublas/include"
}
build_wheel
# The driver stub must define the driver functions ggml calls (cuMemCreate, ...), as NVIDIA's
# does: else the linker drops it as unused, libcuda.so.1 is not NEEDED and the module cannot
# load even where there is a driver. Make it from what the module leaves undefined, relink.
core_built=$(find build -path "*_cuda13/csrc/_core*.so" | head -n 1)
nm -D --undefined-only "$core_built" >"$work/undefined"
sed -n 's/^ *U \(cu[A-Z][A-Za-z0-9_]*\)$/\1/p' "$work/undefined" | sort -u >"$work/driver-symbols"
if [ -s "$work/driver-symbols" ]; then
    sed 's/.*/void &(void) {}/' "$work/driver-symbols" >"$work/stubs/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/stubs/libcuda.so" "$work/stubs/stub.c"
    echo "driver stub: $(wc -l <"$work/driver-symbols") functions ($(head -n 3 "$work/driver-symbols" | tr '\n' ' ')...)"
    rm -f "$core_built"
    build_wheel
fi
wheel=$(ls "$dist"/llamabox_cuda13-*.whl)
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$python" -m zipfile -e "$wheel" "$check/wheel"
core=$(ls "$check"/wheel/llamabox/_core*.so)
# (no pipes into grep -q below: with pipefail, grep leaving early fails the pipe)
readelf -d "$core" >"$check/dynamic"
nm -D --defined-only "$core" >"$check/symbols"
readelf -S "$core" >"$check/sections"
strings -n 5 "$core" >"$check/strings"
needed=$(sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' "$check/dynamic" | tr '\n' ' ')
runpath=$(sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p' "$check/dynamic")
echo "$wheel"
echo "  NEEDED: $needed"
echo "  RUNPATH: $runpath"
for lib in libcudart.so.13 libcublas.so.13 libcuda.so.1; do
    case " $needed " in *" $lib "*) ;; *) echo "not linked to $lib" >&2; exit 1 ;; esac
done
case "$runpath" in *'$ORIGIN/../nvidia/cu13/lib'*) ;; *) echo "no RPATH to NVIDIA's wheels" >&2; exit 1 ;; esac
# ggml's CUDA code (its kernels' launchers) and the device code nvcc embedded (.nv_fatbin)
grep -q ggml_backend_cuda_context "$check/symbols" || { echo "no CUDA backend in _core" >&2; exit 1; }
grep -q nv_fatbin "$check/sections" || { echo "no CUDA device code in _core" >&2; exit 1; }
echo "  CUDA device code (.nv_fatbin) for: $(grep -o 'sm_[0-9][0-9]*' "$check/strings" | sort -u | tr '\n' ' ')"

# pip install brings cudart and cuBLAS as NVIDIA's wheels (Requires-Dist), and _core finds them
# there through its RPATH: the one library left to the machine is the driver's libcuda.so.1.
venv=$check/venv
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "$wheel"
"$venv/bin/python" -m pip list >"$check/pip-list" 2>/dev/null
grep -i "^nvidia" "$check/pip-list" | sed 's/^/  installed: /'
installed=$(ls "$venv"/lib/python3*/site-packages/llamabox/_core*.so)
ldd "$installed" >"$check/ldd" || true
grep -E "libcudart|libcublas" "$check/ldd" | sed 's/^\s*/  ldd: /'
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
    grep -q "$lib => .*site-packages/.*nvidia/cu13/lib/$lib" "$check/ldd" \
        || { echo "$lib is not resolved from NVIDIA's wheel" >&2; exit 1; }
done
# Without a driver the import stops at the loader, naming libcuda.so.1: the one thing missing.
if "$venv/bin/python" -c "import llamabox._core" 2>"$check/import"; then
    echo "  import: loads (a driver is installed here)"
else
    grep -q "libcuda.so.1" "$check/import" || { cat "$check/import" >&2; exit 1; }
    echo "  import: $(tail -n 1 "$check/import")"
fi
echo "OK: the cuda13 wheel compiled and linked for sm_$arch; its CUDA libraries come from pip"
