"""vendor/fetch.py: the tree hash, the guard on local changes, and downloads from a local index.

Everything runs on a tiny synthetic llama-cpp-python sdist built here; the only network is a
package index served on 127.0.0.1 by a thread of this process.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.unit.vendor_modules import load_vendor

pytestmark = pytest.mark.unit

VENDOR = Path(__file__).resolve().parents[2] / "vendor"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


fetch = load_vendor("fetch.py")

# The llama.cpp subtree of the synthetic sdist: path -> (contents, mode); a str is a symlink.
TREE: dict[str, tuple[bytes | str, int]] = {
    "CMakeLists.txt": (b"project(llama)\n", 0o644),
    ".gitignore": (b"*.gguf\n", 0o644),
    "src/llama.cpp": (b"int llama;\n", 0o644),
    "scripts/build.sh": (b"#!/bin/sh\necho build\n", 0o755),
    "models/ggml-vocab-tiny.gguf": (b"GGUF\x03\x00", 0o644),
    "include/llama.h": ("../src/llama.cpp", 0o777),
}


@dataclass
class Sdist:
    path: Path
    pin: Any  # fetch.Pin
    tree: dict[str, tuple[bytes | str, int]] = field(default_factory=dict)


def expected_tree_sha256(tree: dict[str, tuple[bytes | str, int]]) -> str:
    """The documented format, computed independently of fetch.py."""
    lines = []
    for path, (data, mode) in sorted(tree.items()):
        if isinstance(data, str):
            kind, digest = "l", hashlib.sha256(data.encode()).hexdigest()
        else:
            kind, digest = "x" if mode & 0o100 else "f", hashlib.sha256(data).hexdigest()
        lines.append(f"{kind} {digest} {path}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def make_sdist(
    directory: Path,
    version: str = "1.2.3",
    tree: dict[str, tuple[bytes | str, int]] | None = None,
) -> Sdist:
    tree = TREE if tree is None else tree
    top = f"llama_cpp_python-{version}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        # Outside the subtree: must not be unpacked.
        _add(tar, f"{top}/PKG-INFO", b"Name: llama-cpp-python\n", 0o644)
        _add(tar, f"{top}/vendor/other/README", b"not llama.cpp\n", 0o644)
        for rel, (data, mode) in tree.items():
            _add(tar, f"{top}/vendor/llama.cpp/{rel}", data, mode)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    pin = fetch.Pin("llama-cpp-python", version, digest, expected_tree_sha256(tree))
    return Sdist(path, pin, dict(tree))


def _add(tar: tarfile.TarFile, name: str, data: bytes | str, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    if isinstance(data, str):
        info.type = tarfile.SYMTYPE
        info.linkname = data
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_pin(path: Path, pin: Any) -> Path:
    path.write_text("".join(f"{k}={getattr(pin, k)}\n" for k in fetch.PIN_KEYS))
    return path


@pytest.fixture
def sdist(tmp_path: Path) -> Sdist:
    return make_sdist(tmp_path / "made")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "sdist"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "vendor" / "llama.cpp"


def cached(sdist: Sdist, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(sdist.path, cache / sdist.path.name))


def offline_ensure(pin: Any, dest: Path, cache: Path, **kw: Any) -> str:
    """ensure() with an index nobody listens on: these calls must not need it."""
    index = fetch.Index("http://127.0.0.1:9/simple", timeout=1)
    result: str = fetch.ensure(pin, dest, cache, index, offline=True, **kw)
    return result


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network (or pip) was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(fetch.subprocess, "run", refuse)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _IndexServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Accept", "")))
        route = self.server.routes.get(self.path.split("#", 1)[0])
        if route is None:
            self.send_error(404)
            return
        content_type, body = route
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output clean


class _IndexServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, tuple[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, tuple[str, bytes]]], _IndexServer]]:
    servers: list[tuple[_IndexServer, threading.Thread]] = []

    def start(routes: dict[str, tuple[str, bytes]]) -> _IndexServer:
        server = _IndexServer(routes)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def index_routes(sdist: Sdist, style: str, body: bytes | None = None) -> dict[str, Any]:
    name = sdist.path.name
    data = sdist.path.read_bytes() if body is None else body
    # A #sha256= fragment that is wrong: fetch.py must trust the pin, not the index.
    fragment = "#sha256=" + "0" * 64
    if style == "json":
        page = {
            "meta": {"api-version": "1.0"},
            "name": "llama-cpp-python",
            "files": [
                {"filename": "llama_cpp_python-0.0.1.tar.gz", "url": "../../files/old.tar.gz"},
                {"filename": name, "url": f"../../files/{name}{fragment}", "hashes": {}},
            ],
        }
        index_page = (JSON_TYPE, json.dumps(page).encode())
    else:
        links = '<a href="/files/old.tar.gz">llama_cpp_python-0.0.1.tar.gz</a><br>\n'
        links += f'<a href="../../files/{name}{fragment}">{name}</a><br>\n'
        index_page = ("text/html; charset=utf-8", f"<html><body>{links}</body></html>".encode())
    return {
        "/simple/llama-cpp-python/": index_page,
        f"/files/{name}": ("application/octet-stream", data),
    }


def test_tree_hash_is_the_documented_format(sdist: Sdist, tmp_path: Path) -> None:
    fetch.unpack(sdist.pin, sdist.path, tmp_path / "tree")
    first = fetch.tree_hash(fetch.scan_tree(tmp_path / "tree"))
    assert first == sdist.pin.tree_sha256 == expected_tree_sha256(TREE)
    assert fetch.tree_hash(fetch.scan_tree(tmp_path / "tree")) == first
    # Read from the tarball without unpacking (what --print-pin uses), it is the same.
    assert fetch.tree_hash(fetch.sdist_entries(sdist.pin, sdist.path)) == first
    # Only the subtree is unpacked.
    unpacked = [p for p in (tmp_path / "tree").rglob("*") if not p.is_dir()]
    assert sorted(p.relative_to(tmp_path / "tree").as_posix() for p in unpacked) == sorted(TREE)


def test_tree_hash_changes_with_a_byte_the_exec_bit_or_a_link(sdist: Sdist, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    fetch.unpack(sdist.pin, sdist.path, tree)

    def digest() -> str:
        return str(fetch.tree_hash(fetch.scan_tree(tree)))

    base = digest()
    (tree / fetch.STAMP).write_text("the stamp is not part of the tree")
    assert digest() == base

    source = tree / "src/llama.cpp"
    original = source.read_bytes()
    source.write_bytes(b"int llamb;\n")
    assert digest() != base
    source.write_bytes(original)
    assert digest() == base

    source.chmod(0o755)
    assert digest() != base
    source.chmod(0o644)
    assert digest() == base

    (tree / "include/llama.h").unlink()
    (tree / "include/llama.h").symlink_to("../src/other.cpp")
    assert digest() != base


@pytest.mark.parametrize("style", ["json", "html"])
def test_absent_tree_is_downloaded_from_the_index(
    style: str, sdist: Sdist, dest: Path, cache: Path, serve: Any
) -> None:
    server = serve(index_routes(sdist, style))
    index = fetch.Index(f"{server.url}/simple/", timeout=5)

    fetch.ensure(sdist.pin, dest, cache, index)

    assert fetch.tree_hash(fetch.scan_tree(dest)) == sdist.pin.tree_sha256
    assert (dest / "src/llama.cpp").read_bytes() == b"int llama;\n"
    assert os.access(dest / "scripts/build.sh", os.X_OK)
    assert (cache / sdist.path.name).read_bytes() == sdist.path.read_bytes()
    assert not dest.with_name("llama.cpp.tmp").exists()
    page, accept = server.seen[0]
    assert page == "/simple/llama-cpp-python/"
    assert accept == f"{JSON_TYPE}, text/html;q=0.1"
    assert [p for p, _ in server.seen[1:]] == [f"/files/{sdist.path.name}"]

    # A tree that verifies is used as it is, without asking the index again.
    fetch.ensure(sdist.pin, dest, cache, index)
    assert len(server.seen) == 2


def test_a_download_with_the_wrong_sha256_is_refused(
    sdist: Sdist, dest: Path, cache: Path, serve: Any
) -> None:
    server = serve(index_routes(sdist, "json", body=b"not the pinned sdist"))
    index = fetch.Index(f"{server.url}/simple", timeout=5)

    with pytest.raises(fetch.FetchError, match="sha256") as e:
        fetch.ensure(sdist.pin, dest, cache, index, use_pip=False)

    assert "refused" in str(e.value)
    assert not dest.exists()
    assert list(cache.iterdir()) == []  # nothing half-downloaded is left, nothing is cached


def test_a_modified_tree_is_refused_naming_the_path(
    sdist: Sdist, dest: Path, cache: Path, no_network: None
) -> None:
    cached(sdist, cache)
    offline_ensure(sdist.pin, dest, cache)
    (dest / "src/llama.cpp").write_bytes(b"int mine;\n")

    with pytest.raises(fetch.FetchError, match=r"src/llama\.cpp \(modified\)") as e:
        offline_ensure(sdist.pin, dest, cache)
    assert "--force" in str(e.value)
    assert (dest / "src/llama.cpp").read_bytes() == b"int mine;\n"  # never discarded silently

    (dest / "src/llama.cpp").write_bytes(b"int llama;\n")
    (dest / "src/extra.c").write_bytes(b"")
    with pytest.raises(fetch.FetchError, match=r"src/extra\.c \(extra\)"):
        offline_ensure(sdist.pin, dest, cache)
    (dest / "src/extra.c").unlink()
    (dest / "CMakeLists.txt").unlink()
    with pytest.raises(fetch.FetchError, match=r"CMakeLists\.txt \(missing\)"):
        offline_ensure(sdist.pin, dest, cache)

    offline_ensure(sdist.pin, dest, cache, force=True)
    assert (dest / "CMakeLists.txt").exists()


def test_a_tree_fetch_py_did_not_unpack_is_refused(
    sdist: Sdist, dest: Path, cache: Path, no_network: None
) -> None:
    dest.mkdir(parents=True)
    (dest / "CMakeLists.txt").write_text("my own llama.cpp\n")
    with pytest.raises(fetch.FetchError, match="was not unpacked by fetch.py"):
        offline_ensure(sdist.pin, dest, cache)
    assert (dest / "CMakeLists.txt").read_text() == "my own llama.cpp\n"


def test_a_stale_stamp_reunpacks(
    sdist: Sdist, dest: Path, cache: Path, tmp_path: Path, no_network: None
) -> None:
    old_tree = {"CMakeLists.txt": (b"project(old)\n", 0o644), "src/gone.c": (b"", 0o644)}
    old = make_sdist(tmp_path / "old", version="1.0.0", tree=old_tree)
    cached(old, cache)
    offline_ensure(old.pin, dest, cache)
    assert (dest / "src/gone.c").exists()

    cached(sdist, cache)
    offline_ensure(sdist.pin, dest, cache)

    assert fetch.tree_hash(fetch.scan_tree(dest)) == sdist.pin.tree_sha256
    assert not (dest / "src/gone.c").exists()
    assert fetch.read_stamp(dest).fields["version"] == "1.2.3"


def test_a_stamp_of_the_old_format_from_an_older_pin_reunpacks(
    sdist: Sdist, dest: Path, cache: Path, no_network: None
) -> None:
    dest.mkdir(parents=True)
    (dest / "CMakeLists.txt").write_text("an older llama.cpp\n")
    (dest / fetch.STAMP).write_text("ab" * 32 + "\n")  # what fetch.py wrote before tree_sha256
    cached(sdist, cache)
    offline_ensure(sdist.pin, dest, cache)
    assert fetch.tree_hash(fetch.scan_tree(dest)) == sdist.pin.tree_sha256


def test_local_changes_to_an_older_pins_tree_are_refused(
    sdist: Sdist, dest: Path, cache: Path, tmp_path: Path, no_network: None
) -> None:
    old = make_sdist(tmp_path / "old", version="1.0.0", tree={"a.c": (b"old\n", 0o644)})
    cached(old, cache)
    offline_ensure(old.pin, dest, cache)
    (dest / "a.c").write_bytes(b"edited\n")
    cached(sdist, cache)

    with pytest.raises(fetch.FetchError, match=r"1\.0\.0 with local changes .*a\.c \(modified\)"):
        offline_ensure(sdist.pin, dest, cache)
    assert (dest / "a.c").read_bytes() == b"edited\n"


def test_a_verified_tree_without_a_stamp_gets_one(
    sdist: Sdist, dest: Path, cache: Path, no_network: None
) -> None:
    fetch.unpack(sdist.pin, sdist.path, dest)
    offline_ensure(sdist.pin, dest, cache)  # no sdist in the cache, and none needed
    stamp = fetch.read_stamp(dest)
    assert stamp.fields == fetch._pin_fields(sdist.pin)
    assert stamp.verified_entries() == fetch.scan_tree(dest)


def test_a_wrong_tree_sha256_in_the_pin_changes_nothing(
    sdist: Sdist, dest: Path, cache: Path, tmp_path: Path, no_network: None
) -> None:
    old = make_sdist(tmp_path / "old", version="1.0.0", tree={"a.c": (b"old\n", 0o644)})
    cached(old, cache)
    offline_ensure(old.pin, dest, cache)
    cached(sdist, cache)
    wrong = fetch.Pin(sdist.pin.package, sdist.pin.version, sdist.pin.sha256, "0" * 64)

    with pytest.raises(fetch.FetchError, match="tree_sha256"):
        offline_ensure(wrong, dest, cache)
    assert (dest / "a.c").read_bytes() == b"old\n"
    assert not dest.with_name("llama.cpp.tmp").exists()


def test_an_unreachable_index_without_pip_gives_a_clear_error(
    sdist: Sdist,
    dest: Path,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as s:  # a port that was just free, so nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(fetch, "pip_importable", lambda: False)
    pin = write_pin(tmp_path / "llama.cpp.pin", sdist.pin)
    env = {
        "LLAMABOX_INDEX_URL": f"http://user:secret@127.0.0.1:{port}/simple",
        "LLAMABOX_CACHE_DIR": str(cache.parent),
    }

    rc = fetch.main(["--pin", str(pin), "--dest", str(dest)], environ=env)

    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    assert f"http://***@127.0.0.1:{port}/simple/llama-cpp-python/" in err
    assert "secret" not in err
    assert "pip is not importable" in err
    remedies = ["PIP_INDEX_URL", "LLAMABOX_INDEX_URL", "LLAMABOX_LLAMA_CPP_DIR"]
    for remedy in [*remedies, str(cache / sdist.path.name)]:
        assert remedy in err
    assert not dest.exists()


def test_check_verifies_without_network_or_writing(
    sdist: Sdist,
    dest: Path,
    cache: Path,
    tmp_path: Path,
    no_network: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pin = write_pin(tmp_path / "llama.cpp.pin", sdist.pin)
    env = {"LLAMABOX_CACHE_DIR": str(cache.parent), "LLAMABOX_INDEX_URL": "http://127.0.0.1:9"}
    check = ["--check", "--pin", str(pin), "--dest", str(dest)]

    assert fetch.main(check, environ=env) == 1
    assert "missing" in capsys.readouterr().err
    assert not dest.exists()

    fetch.unpack(sdist.pin, sdist.path, dest)
    assert fetch.main(check, environ=env) == 0
    assert not (dest / fetch.STAMP).exists()  # --check writes nothing, not even the stamp

    (dest / "scripts/build.sh").chmod(0o644)
    assert fetch.main(check, environ=env) == 1
    err = capsys.readouterr().err
    assert "tree_sha256" in err  # no stamp and no cached sdist: nothing to name the path from
    cached(sdist, cache)
    assert fetch.main(check, environ=env) == 1
    assert "scripts/build.sh (executable bit changed)" in capsys.readouterr().err


def test_offline_never_downloads(
    sdist: Sdist,
    dest: Path,
    cache: Path,
    tmp_path: Path,
    no_network: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pin = write_pin(tmp_path / "llama.cpp.pin", sdist.pin)
    env = {"LLAMABOX_OFFLINE": "1", "LLAMABOX_CACHE_DIR": str(cache.parent)}
    argv = ["--pin", str(pin), "--dest", str(dest)]

    assert fetch.main(argv, environ=env) == 1
    err = capsys.readouterr().err
    assert "LLAMABOX_OFFLINE" in err and str(cache / sdist.path.name) in err
    assert "Traceback" not in err

    cached(sdist, cache)  # the cached sdist is enough
    assert fetch.main(argv, environ=env) == 0
    assert fetch.tree_hash(fetch.scan_tree(dest)) == sdist.pin.tree_sha256


def test_the_index_comes_from_the_environment() -> None:
    assert fetch.Index.from_env({}).url == "https://pypi.org/simple"
    assert fetch.Index.from_env({"PIP_INDEX_URL": "https://m/simple/"}).url == "https://m/simple"
    env = {"PIP_INDEX_URL": "https://m/simple", "LLAMABOX_INDEX_URL": "https://l/simple"}
    assert fetch.Index.from_env(env).url == "https://l/simple"
    assert fetch.cache_dir({"LLAMABOX_CACHE_DIR": "/c"}) == Path("/c/sdist")


def test_the_build_backend_has_every_hook_of_scikit_build_core() -> None:
    skbuild = pytest.importorskip("scikit_build_core.build")
    backend = load_vendor("build_backend.py", name="_llamabox_build_backend_under_test")
    for hook in skbuild.__all__:
        assert callable(getattr(backend, hook)), hook
    assert backend.build_sdist is not skbuild.build_sdist
