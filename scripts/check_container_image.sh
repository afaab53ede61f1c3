#!/usr/bin/env bash
# Builds an image of deploy/docker/ with buildah, without Docker or a registry, and serves a
# model from it:
#
#   scripts/check_container_image.sh        # as root; apt-get install debootstrap buildah
#   DOCKERFILE=deploy/docker/Dockerfile.vulkan scripts/check_container_image.sh   # on lavapipe
#
# 1. A Debian root made by debootstrap (python3, python3-venv, python3-dev) is imported as the
#    Dockerfile's base image, python:3.12-slim-<release>. It stands in for Docker Hub's image,
#    which cannot be pulled here: the same Debian release, but Debian's Python in /usr/bin
#    instead of Python 3.12 in /usr/local/bin, and this machine's CA certificates (its TLS
#    proxy to PyPI) in the image's store.
# 2. buildah builds the Dockerfile as it is (both stages, chroot isolation, Docker format so
#    that HEALTHCHECK is kept): the builder compiles llamabox from this checkout, the runtime
#    stage installs the wheels.
# 3. The image's own command runs in a container as its user, with the model mounted: the
#    script checks /health and /v1/completions from outside, the HEALTHCHECK command inside,
#    that the process is uid 10001, that the runtime has no compiler, and that SIGTERM stops it.
#
# ROOTFS=dir keeps the debootstrap root between runs (default /var/tmp/llamabox-bookworm), and
# the imported base image is kept too (REIMPORT=1 imports it again);
# MODEL=file.gguf serves another model (default: Gemma 3 270M from the gemma extra).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
dockerfile=${DOCKERFILE:-deploy/docker/Dockerfile}
# The base image the Dockerfile names (python:3.12-slim-<release>) and that Debian release
from=$(sed -n 's/^FROM \([^ ]*\) AS builder$/\1/p' "$dockerfile")
suite=${from##*-}
case "$from" in python:*-slim-bookworm | python:*-slim-trixie) ;; *)
    echo "$dockerfile builds on $from: only Debian-based python images have a stand-in here" >&2
    exit 1 ;;
esac
flavour=$(basename "$dockerfile" | sed -n 's/^Dockerfile\.\(.*\)$/-\1/p')
image="localhost/llamabox:$version$flavour"
base="docker.io/library/$from"
rootfs=${ROOTFS:-/var/tmp/llamabox-$suite}
model=${MODEL:-$(python -c "from llamabox.models import default_model_path; print(default_model_path())")}
port=${PORT:-18080}
work=$(mktemp -d)
ctr=""
cleanup() {
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
say() { printf '== %s\n' "$*"; }

# python3-dev: Docker Hub's python images carry Python's headers, which the build needs.
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    say "debootstrap $suite into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
        "$suite" "$rootfs" http://deb.debian.org/debian
elif ! ls "$rootfs"/usr/include/python3*/Python.h >/dev/null 2>&1; then
    chroot "$rootfs" sh -c 'apt-get update -qq && apt-get install -y -qq python3-dev >/dev/null && apt-get clean'
fi
# This machine reaches PyPI through a TLS proxy whose CA only its own store has: the stand-in
# base image gets the same CAs and pip is pointed at that store, as the host's pip is.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
fi
if [ -n "${REIMPORT:-}" ] || ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    say "importing $rootfs as $base"
    tar -C "$rootfs" -cf "$work/rootfs.tar" .
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$work/Dockerfile"
    buildah bud --quiet --isolation chroot -t "$base" -f "$work/Dockerfile" "$work" >/dev/null
fi

say "building $image from $dockerfile"
start=$(date +%s)
buildah bud --isolation chroot --format docker --pull=never --layers \
    -f "$dockerfile" -t "$image" .
say "built in $(($(date +%s) - start)) s"

buildah inspect --type image "$image" >"$work/image.json"
config() {  # a field of the image's Docker config, as JSON
    python -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['Docker']['config'][sys.argv[2]]))" \
        "$work/image.json" "$1"
}
user=$(config User)
health=$(config Healthcheck)
entrypoint=$(config Entrypoint)
say "user $user, entrypoint $entrypoint, volumes $(config Volumes)"
say "healthcheck $health"
[ "$user" = '"10001:10001"' ] || { echo "the image's user is not 10001" >&2; exit 1; }
[ "$entrypoint" = '["llamabox", "serve"]' ] || { echo "unexpected entrypoint" >&2; exit 1; }

ctr=$(buildah from --pull=never "$image")
# The container's environment and user, the model read-only, the host's network. The model goes
# on /srv/models, not the image's /models volume: `buildah run` (1.28, chroot isolation) lays
# the image's anonymous VOLUME over a bind mount at the same path (docker and podman run don't).
# The Vulkan image runs on Mesa's lavapipe here (a Vulkan driver on the CPU, in the image),
# which ggml uses only when GGML_VK_VISIBLE_DEVICES names it: all layers then go to Vulkan0.
vk_env=()
[ "$flavour" = "-vulkan" ] && vk_env=(--env GGML_VK_VISIBLE_DEVICES=0)
run() {
    buildah run --isolation chroot --user 10001:10001 \
        -v "$(dirname "$model"):/srv/models:ro" "${vk_env[@]}" \
        --env "LLAMA_ARG_MODEL=/srv/models/$(basename "$model")" --env "LLAMA_ARG_PORT=$port" \
        "$ctr" -- "$@"
}
if run sh -c 'command -v gcc cc c++' >/dev/null 2>&1; then
    echo "the runtime image has a compiler" >&2
    exit 1
fi
say "serving $(basename "$model") from the image on port $port"
setsid bash -c "$(declare -f run); $(declare -p vk_env); ctr=$ctr model=$model port=$port; run llamabox serve" \
    >"$work/serve.log" 2>&1 &
leader=$!
ok=""
for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then ok=1; break; fi
    kill -0 "$leader" 2>/dev/null || break
    sleep 0.5
done
[ -n "$ok" ] || { cat "$work/serve.log"; echo "the server did not get healthy" >&2; exit 1; }
uid=$(ps -o uid= -p "$(pgrep -f "bin/llamabox serve" | head -n 1)" | tr -d ' ')
say "healthy; the server runs as uid $uid"
[ "$uid" = 10001 ] || { echo "the server does not run as 10001" >&2; exit 1; }
curl -fsS "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The capital of France is", "max_tokens": 8}' | tee "$work/completion.json"
echo
python -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['usage']['completion_tokens'] > 0" \
    "$work/completion.json"
# The HEALTHCHECK's command, inside the container: ["CMD", "python", "-c", "..."]
python - "$health" >"$work/healthcheck" <<'EOF'
import json, shlex, sys
test = json.loads(sys.argv[1])["Test"]
assert test[0] == "CMD", test
print(shlex.join(test[1:]))
EOF
eval "run $(cat "$work/healthcheck")" && say "HEALTHCHECK command: healthy"
curl -fsS "http://127.0.0.1:$port/props" >"$work/props.json"
python - "$work/props.json" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))["system_info"]
devices = ", ".join(f"{d['name']} ({d['description']})" for d in info["devices"])
print(f"== {info['backend']} build; CPU variant {info['cpu_variant']}; devices: {devices}")
EOF
if [ "$flavour" = "-vulkan" ]; then
    grep -q "offloaded .* layers to GPU" "$work/serve.log" && grep "offloaded" "$work/serve.log" | sed 's/^/== /'
fi
kill -TERM -- "-$leader"
for _ in $(seq 1 60); do
    pgrep -f "bin/llamabox serve" >/dev/null || break
    sleep 0.5
done
if pgrep -f "bin/llamabox serve" >/dev/null; then
    echo "SIGTERM did not stop the server" >&2
    exit 1
fi
grep -E "model loaded|Shutting|shutdown|stopp" "$work/serve.log" | tail -n 5 || true
say "OK: $image built and served"
