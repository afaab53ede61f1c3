#!/usr/bin/env bash
# Compiles and links the vulkan wheel on a machine without a GPU (docs/backends.md):
#
#   scripts/check_vulkan_build.sh     # Debian/Ubuntu: apt-get install libvulkan-dev glslc spirv-headers
#
# (as root on Debian 12, whose Vulkan headers are too old for this llama.cpp: see below)
#
# Builds it with scripts/build_backend_wheel.sh vulkan (ggml compiles its shaders with glslc
# first), installs it into a fresh venv and imports it: the module loads (libvulkan.so.1 is the
# system's loader), reports the vulkan build and lists the Vulkan devices the loader finds.
# Where the only one is Mesa's lavapipe (a Vulkan driver on the CPU), it runs the tiny test
# model on it and compares the greedy tokens with this interpreter's CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
command -v glslc >/dev/null || { echo "needs glslc (apt-get install glslc)" >&2; exit 1; }
echo "glslc: $(glslc --version | head -n 1)"

# The Vulkan headers must know VK_EXT_layer_settings (vk::LayerSettingsCreateInfoEXT), which
# Debian 12's libvulkan-dev (1.3.239) does not: then take Debian 13's (1.4.309), unpacked into
# build/vulkan-deps without installing it. The loader library stays the system's.
header_version=$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\)$/\1/p' /usr/include/vulkan/vulkan_core.h 2>/dev/null || true)
extra=()
if ! grep -q LayerSettingsCreateInfoEXT /usr/include/vulkan/vulkan_structs.hpp 2>/dev/null; then
    deps=$PWD/build/vulkan-deps
    if [ ! -f "$deps/usr/include/vulkan/vulkan.hpp" ]; then
        echo "the system's Vulkan headers (1.3.${header_version:-?}) are too old: taking Debian 13's"
        apt=$deps/apt
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
            >"$apt/sources.list"
        opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
        apt-get "${opts[@]}" update -qq
        (cd "$apt" && apt-get "${opts[@]}" download libvulkan-dev 2>/dev/null)
        dpkg -x "$apt"/libvulkan-dev_*.deb "$deps"
    fi
    extra+=("-Ccmake.define.Vulkan_INCLUDE_DIR=$deps/usr/include")
    echo "Vulkan headers: $(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\)$/1.x.\1/p' "$deps/usr/include/vulkan/vulkan_core.h") from $deps"
fi

dist=${DIST:-dist/vulkan}
rm -f "$dist"/llamabox_vulkan-*.whl
DIST=$dist PYTHON=$python scripts/build_backend_wheel.sh vulkan "${extra[@]}" "$@"
wheel=$(ls "$dist"/llamabox_vulkan-*.whl)

venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "$wheel"
core=$("$venv/bin/python" -c "import llamabox._core as c; print(c.__file__)")
needed=$(readelf -d "$core" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')
echo "$wheel"
echo "  NEEDED: $needed"
case " $needed " in *" libvulkan.so.1 "*) ;; *) echo "not linked to libvulkan.so.1" >&2; exit 1 ;; esac
(cd "$venv" && "$venv/bin/llamabox" --version)
backend=$(cd "$venv" && "$venv/bin/python" -c "import llamabox._core as c; i = c.system_info(); print(i['backend'], 'Vulkan' in i['backends'])")
[ "$backend" = "vulkan True" ] || { echo "unexpected build: $backend" >&2; exit 1; }
echo "OK: the vulkan wheel compiled, linked and imports (ggml backends include Vulkan)"

# With Mesa's lavapipe (apt-get install mesa-vulkan-drivers), a Vulkan device that is the CPU,
# ggml's Vulkan code runs for real: ggml skips CPU devices unless GGML_VK_VISIBLE_DEVICES names
# one. The tiny test model, all layers on Vulkan0, against this interpreter's own build.
devices=$(cd "$venv" && GGML_VK_VISIBLE_DEVICES=0 "$venv/bin/llamabox" --version 2>/dev/null || true)
if grep -q "device Vulkan0" <<<"$devices"; then
    grep "device Vulkan0" <<<"$devices"
    model="$venv/tiny.gguf"
    "$python" -c "import sys; from tests.fixtures import make_tiny_llama; make_tiny_llama(sys.argv[1])" "$model"
    "$python" scripts/_vulkan_run.py "$venv" "$model"
else
    echo "no Vulkan device here (not even lavapipe): nothing run on Vulkan"
fi
