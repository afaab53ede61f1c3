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
# Then checks the module: linked to libcudart.so.13, libcublas.so.13 and libcuda.so.1, with
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
rm -f "$dist"/llamabox_cuda13-*.whl
DIST=$dist PYTHON=$python CUDACXX=$nvcc scripts/build_backend_wheel.sh cuda13 \
    "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$arch" \
    "-Ccmake.define.CMAKE_CUDA_COMPILER=$nvcc" \
    "-Ccmake.define.CUDA_cublas_LIBRARY=$cublas/lib/libcublas.so.13" \
    "-Ccmake.define.CUDA_cublasLt_LIBRARY=$cublas/lib/libcublasLt.so.13" \
    "-Ccmake.define.CUDA_cuda_driver_LIBRARY=$work/stubs/libcuda.so" \
    "-Ccmake.define.CMAKE_CUDA_FLAGS=-isystem $cublas/include" \
    "-Ccmake.define.CMAKE_CXX_FLAGS=-isystem $cublas/include"

wheel=$(ls "$dist"/llamabox_cuda13-*.whl)
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$python" -m zipfile -e "$wheel" "$check"
core=$(ls "$check"/llamabox/_core*.so)
needed=$(readelf -d "$core" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')
echo "$wheel"
echo "  NEEDED: $needed"
for lib in libcudart.so.13 libcublas.so.13 libcuda.so.1; do
    case " $needed " in *" $lib "*) ;; *) echo "not linked to $lib" >&2; exit 1 ;; esac
done
nm -D --defined-only "$core" | grep -q ggml_backend_cuda_reg || { echo "no CUDA backend in _core" >&2; exit 1; }
if command -v cuobjdump >/dev/null || [ -x "$toolkit/bin/cuobjdump" ]; then
    archs=$("${toolkit}/bin/cuobjdump" --list-elf "$core" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')
    echo "  CUDA kernels for: ${archs:-none listed}"
fi
runpath=$(readelf -d "$core" | sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p')
echo "  RUNPATH: $runpath"
case "$runpath" in *'$ORIGIN/../nvidia/cu13/lib'*) ;; *) echo "no RPATH to NVIDIA's wheels" >&2; exit 1 ;; esac

# pip install brings cudart and cuBLAS as NVIDIA's wheels (Requires-Dist), and _core finds them
# there through its RPATH: the one library left to the machine is the driver's libcuda.so.1.
venv=$check/venv
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "$wheel"
"$venv/bin/python" -m pip list 2>/dev/null | grep -i "^nvidia" | sed 's/^/  installed: /'
installed=$(ls "$venv"/lib/python3*/site-packages/llamabox/_core*.so)
ldd "$installed" | grep -E "libcudart|libcublas|libcuda\." | sed 's/^\s*/  ldd: /'
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
    ldd "$installed" | grep "$lib => .*site-packages/nvidia/cu13/lib/" >/dev/null \
        || { echo "$lib is not resolved from NVIDIA's wheel" >&2; exit 1; }
done
echo "OK: the cuda13 wheel compiled and linked for sm_$arch; its CUDA libraries come from pip"
