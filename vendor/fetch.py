#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into vendor/llama.cpp, and verify it.

llama.cpp is taken from the source distribution of llama-cpp-python, which carries it under
``vendor/llama.cpp/``. The sdist named in ``llama.cpp.pin`` is downloaded straight from the
package index (``$LLAMABOX_INDEX_URL``, else ``$PIP_INDEX_URL``, else PyPI), falling back to
``pip download`` when that fails and pip is importable. Its sha256 is checked against the pin, it
is cached under ``$LLAMABOX_CACHE_DIR/sdist`` (default ``~/.cache/llamabox/sdist``), and only the
llama.cpp subtree is unpacked. The unpacked tree itself is verified against ``tree_sha256`` in
the pin, on every run: a tree that matches is used as it is, without any network.

``--check`` verifies only. ``LLAMABOX_OFFLINE=1`` never downloads.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html.parser
import http.client
import importlib.util
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

HERE = Path(__file__).resolve().parent
DEFAULT_PIN = HERE / "llama.cpp.pin"
DEFAULT_DEST = HERE / "llama.cpp"
DEFAULT_INDEX = "https://pypi.org/simple"
# Written into the unpacked tree and left out of its hash: which pin it came from, and its files.
STAMP = ".llamabox-pin"
# Per socket operation (connect, each read), not for the whole download.
TIMEOUT_S = 60.0
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
ACCEPT = f"{JSON_TYPE}, text/html;q=0.1"
PIN_KEYS = ("package", "version", "sha256", "tree_sha256")


class FetchError(Exception):
    """A failure the user can act on: main() prints the message, without a traceback."""


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    sha256: str
    tree_sha256: str

    @classmethod
    def load(cls, path: Path) -> Pin:
        try:
            fields = parse_pin_text(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise FetchError(f"cannot read the pin {path}: {e}") from None
        missing = [k for k in PIN_KEYS if not fields.get(k)]
        if missing:
            raise FetchError(f"the pin {path} lacks {', '.join(missing)}")
        return cls(*(fields[k] for k in PIN_KEYS))

    @property
    def sdist_name(self) -> str:
        # PEP 625 file name: the normalized project name with underscores.
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}.tar.gz"

    @property
    def subtree(self) -> str:
        """Where llama.cpp sits inside the sdist, with a trailing slash."""
        return f"{self.sdist_name.removesuffix('.tar.gz')}/vendor/llama.cpp/"

    @property
    def project(self) -> str:
        # PEP 503 normalized name: the path of the project's page on a simple index.
        return re.sub(r"[-_.]+", "-", self.package).lower()


def parse_pin_text(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


# The tree hash: one line per file, "<kind> <sha256> <path>\n", sorted by path; kind is "x" for
# an executable file, "f" for another file, "l" for a symlink (the sha256 of its target).


class Entry(NamedTuple):
    path: str
    kind: str
    digest: str

    def line(self) -> str:
        return f"{self.kind} {self.digest} {self.path}\n"


def tree_hash(entries: Iterable[Entry]) -> str:
    h = hashlib.sha256()
    for e in sorted(entries):
        h.update(e.line().encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_digest(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _file_digest(path: str) -> tuple[bool, str]:
    """(executable, sha256) of one regular file."""
    with open(path, "rb") as f:
        return bool(os.fstat(f.fileno()).st_mode & stat.S_IXUSR), _read_digest(f)


def _walk(root: Path) -> Iterator[tuple[str, str, os.DirEntry[str]]]:
    """(relative POSIX path, kind, entry) for everything below root but directories."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for de in it:
                path = f"{rel}/{de.name}" if rel else de.name
                if path == STAMP:
                    continue
                if de.is_symlink():
                    yield path, "l", de
                elif de.is_dir():
                    stack.append(path)
                elif de.is_file():
                    yield path, "f", de
                else:
                    yield path, "?", de  # a fifo or device: never ours, so never a match


def scan_tree(root: Path) -> list[Entry]:
    """Every file and symlink below root (not the stamp), with its digest."""
    entries = []
    for path, kind, de in _walk(root):
        if kind == "f":
            executable, digest = _file_digest(de.path)
            entries.append(Entry(path, "x" if executable else "f", digest))
        elif kind == "l":
            target = os.fsencode(os.readlink(de.path))
            entries.append(Entry(path, "l", hashlib.sha256(target).hexdigest()))
        else:
            entries.append(Entry(path, kind, ""))
    return sorted(entries)


def sdist_entries(pin: Pin, sdist: Path) -> list[Entry]:
    """The entries the pin's subtree of sdist will have once unpacked, read from the tarball."""
    entries = []
    with tarfile.open(sdist) as tar:
        for m in tar:
            rel = m.name.removeprefix(pin.subtree)
            if rel == m.name or rel in ("", STAMP) or m.isdir():
                continue
            if m.issym():
                digest = hashlib.sha256(os.fsencode(m.linkname)).hexdigest()
                entries.append(Entry(rel, "l", digest))
            elif m.isfile() or m.islnk():
                f = tar.extractfile(m)
                assert f is not None  # regular files and hard links always have contents
                kind = "x" if m.mode & stat.S_IXUSR else "f"
                entries.append(Entry(rel, kind, _read_digest(f)))
    return sorted(entries)


def describe_difference(expected: Sequence[Entry], actual: Sequence[Entry]) -> str:
    """'N paths differ, the first: <what> <path>' for two entry lists."""
    want = {e.path: e for e in expected}
    have = {e.path: e for e in actual}
    differ = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
    if not differ:
        return "no path differs"
    first = differ[0]
    w, h = want.get(first), have.get(first)
    if h is None:
        what = "missing"
    elif w is None:
        what = "extra"
    elif {w.kind, h.kind} == {"x", "f"}:
        what = "executable bit changed" if w.digest == h.digest else "modified, and its mode"
    elif w.kind != h.kind:
        what = "type changed"
    else:
        what = "modified"
    count = f"{len(differ)} paths differ" if len(differ) > 1 else "1 path differs"
    return f"{count}, the first: {first} ({what})"


# The stamp: "key=value" lines naming the pin, a blank line, then the tree's entry lines. The
# entries let a later run name the file that changed, without any network.


@dataclass
class Stamp:
    fields: dict[str, str]
    entries: list[Entry] | None = None

    def verified_entries(self) -> list[Entry] | None:
        """The recorded entries, if they hash to the recorded tree_sha256."""
        if self.entries is None or tree_hash(self.entries) != self.fields.get("tree_sha256"):
            return None
        return self.entries


def read_stamp(dest: Path) -> Stamp | None:
    try:
        text = (dest / STAMP).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    head, sep, body = text.partition("\n\n")
    if not sep and re.fullmatch(r"[0-9a-f]{64}\s*", text):
        return Stamp({"sha256": text.strip()})  # the old stamp: only the sdist's sha256
    entries = []
    for line in body.splitlines():
        kind, _, rest = line.partition(" ")
        digest, _, path = rest.partition(" ")
        if not path:
            return Stamp(parse_pin_text(head))
        entries.append(Entry(path, kind, digest))
    return Stamp(parse_pin_text(head), sorted(entries))


def _pin_fields(pin: Pin) -> dict[str, str]:
    return {k: getattr(pin, k) for k in PIN_KEYS}


def write_stamp(dest: Path, pin: Pin, entries: Iterable[Entry]) -> None:
    head = "".join(f"{k}={v}\n" for k, v in _pin_fields(pin).items())
    body = "".join(e.line() for e in sorted(entries))
    # Not atomic, on purpose: a temporary name would be an extra file in the tree. A stamp cut
    # short only loses its file list, which then fails its own hash and is not used.
    (dest / STAMP).write_text(f"{head}\n{body}", encoding="utf-8", errors="surrogateescape")


# Downloading the sdist.


@dataclass(frozen=True)
class Index:
    url: str
    cafile: str | None = None
    timeout: float = TIMEOUT_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Index:
        url = environ.get("LLAMABOX_INDEX_URL") or environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
        # A mirror behind a private CA comes with PIP_CERT, as it does for pip.
        return cls(url.rstrip("/"), environ.get("PIP_CERT") or None)


def redact(url: str) -> str:
    """url without its credentials (a token may be the user name), for messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + _host(parts)))


def _host(parts: urllib.parse.SplitResult) -> str:
    return parts.netloc.rpartition("@")[2]


def _open(url: str, index: Index, accept: str | None = None) -> http.client.HTTPResponse:
    """GET url. Credentials in the index URL go to the index's host only, as a header."""
    parts = urllib.parse.urlsplit(urllib.parse.urldefrag(url).url)
    headers = {"User-Agent": "llamabox-vendor-fetch"}
    if accept:
        headers["Accept"] = accept
    creds = urllib.parse.urlsplit(index.url)
    if creds.username is not None and _host(creds) == _host(parts):
        user, password = (urllib.parse.unquote(v or "") for v in (creds.username, creds.password))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=_host(parts)))
    request = urllib.request.Request(bare, headers=headers)
    context = ssl.create_default_context(cafile=index.cafile) if index.cafile else None
    response: http.client.HTTPResponse = urllib.request.urlopen(
        request, timeout=index.timeout, context=context
    )
    return response


class _Links(html.parser.HTMLParser):
    """The hrefs of a PEP 503 page, and its <base href> if it has one."""

    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if href is None:
            return
        if tag == "base" and self.base is None:
            self.base = href
        elif tag == "a":
            self.hrefs.append(href)


def project_page(pin: Pin, index: Index) -> str:
    return f"{index.url.rstrip('/')}/{pin.project}/"


def sdist_url(pin: Pin, index: Index) -> str:
    """The URL of the pin's sdist, from the project's page on the index (PEP 691 or PEP 503)."""
    page = project_page(pin, index)
    with _open(page, index, accept=ACCEPT) as response:
        body = response.read()
        base = response.geturl()
        headers = response.headers
    text = body.decode(headers.get_content_charset() or "utf-8", errors="replace")
    if "json" in headers.get_content_type():
        try:
            files = json.loads(text)["files"]
            hrefs = [str(f["url"]) for f in files if str(f["filename"]).lower() == pin.sdist_name]
        except (ValueError, LookupError, TypeError) as e:
            raise OSError(f"{redact(page)} is not a PEP 691 project page: {e!r}") from None
    else:
        parser = _Links()
        parser.feed(text)
        base = urllib.parse.urljoin(base, parser.base or "")
        hrefs = [h for h in parser.hrefs if _href_name(h) == pin.sdist_name]
    if not hrefs:
        raise OSError(f"{redact(page)} does not list {pin.sdist_name}")
    # Any #sha256= fragment is dropped: the pin is what we trust.
    return urllib.parse.urldefrag(urllib.parse.urljoin(base, hrefs[0])).url


def _href_name(href: str) -> str:
    path = urllib.parse.urlsplit(href).path
    return urllib.parse.unquote(path.rstrip("/").rpartition("/")[2]).lower()


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return _read_digest(f)


def _download(url: str, index: Index, pin: Pin, target: Path) -> None:
    """Stream url to a temporary file next to target, check it, then move it into place."""
    print(f"llamabox: downloading {redact(url)}", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open(url, index) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != pin.sha256:
            raise OSError(f"got sha256 {h.hexdigest()}, the pin says {pin.sha256}: refused")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is not a secret
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pip_download(pin: Pin, target: Path) -> None:
    # pip reads the user's pip.conf (mirrors, proxies, credentials) where we do not.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", tmp, f"{pin.package}=={pin.version}",
        ]  # fmt: skip
        print("llamabox: fetching llama.cpp:", " ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, stdout=sys.stderr).returncode
        got = Path(tmp) / pin.sdist_name
        if rc != 0 or not got.exists():
            raise OSError(f"pip download exited with {rc}" if rc else f"no {got.name} from pip")
        digest = sha256_of(got)
        if digest != pin.sha256:
            raise OSError(f"got sha256 {digest}, the pin says {pin.sha256}: refused")
        os.replace(got, target)


def pip_importable() -> bool:
    return importlib.util.find_spec("pip") is not None


def get_sdist(
    pin: Pin, cache: Path, index: Index, *, offline: bool = False, use_pip: bool = False
) -> Path:
    """The pin's sdist in cache, downloaded first if it is not there (or is not the right file)."""
    target = cache / pin.sdist_name
    cached = sha256_of(target) if target.is_file() else None
    if cached == pin.sha256:
        return target
    remedy = (
        f"  - put {pin.sdist_name} (sha256 {pin.sha256}) at {target}\n"
        "  - or point LLAMABOX_LLAMA_CPP_DIR at a llama.cpp checkout"
    )
    found = "is not the pinned file" if cached else "is not there"
    if offline:
        raise FetchError(
            f"LLAMABOX_OFFLINE is set and the pinned llama.cpp sdist {target} {found}.\n"
            f"Remedies:\n  - unset LLAMABOX_OFFLINE to download it\n{remedy}"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(
            f"cannot create the download cache {cache}: {e}\n"
            "Set LLAMABOX_CACHE_DIR to a writable directory."
        ) from None
    tried = [f"  - {target}: sha256 {cached}, not the pinned file"] if cached else []
    page = project_page(pin, index)
    try:
        _download(sdist_url(pin, index), index, pin, target)
        return target
    # URLError, HTTPError and timeouts are OSErrors; ValueError: a URL urllib cannot open.
    except (OSError, ValueError, http.client.HTTPException) as e:
        tried.append(f"  - {redact(page)}: {_reason(e, page)}")
    if use_pip:
        print(f"llamabox: {tried[-1].lstrip(' -')}; trying pip", file=sys.stderr, flush=True)
        try:
            _pip_download(pin, target)
            return target
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"  - pip download {pin.package}=={pin.version}: {_reason(e)}")
    else:
        tried.append(f"  - no pip download fallback: pip is not importable in {sys.executable}")
    raise FetchError(
        f"cannot download the pinned llama.cpp source, {pin.sdist_name}.\nTried:\n"
        + "\n".join(tried)
        + "\nRemedies:\n  - check the network, or set PIP_INDEX_URL or LLAMABOX_INDEX_URL to a"
        f" reachable package index (simple API)\n{remedy}"
    )


def _reason(e: BaseException, page: str = "") -> str:
    if isinstance(e, urllib.error.HTTPError):
        where = "" if e.url == page else f" from {redact(e.url)}"
        return f"HTTP {e.code} {e.reason}{where}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


# Unpacking and verifying the tree.


def _safe_members(tar: tarfile.TarFile, pin: Pin) -> list[tarfile.TarInfo]:
    """The subtree's members, renamed relative to it."""
    members = []
    for m in tar.getmembers():
        rel = m.name.removeprefix(pin.subtree)
        if rel == m.name or not rel:
            continue
        m.name = rel
        if not hasattr(tarfile, "data_filter"):
            # Pythons before 3.10.12 have no extraction filter: refuse what it would refuse.
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                raise FetchError(f"refusing to unpack {rel!r} from {pin.sdist_name}")
        members.append(m)
    return members


def unpack(pin: Pin, sdist: Path, into: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = _safe_members(tar, pin)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, members=members, filter="data")
        else:
            tar.extractall(into, members=members)


def install(pin: Pin, sdist: Path, dest: Path) -> None:
    """Unpack into a temporary directory, verify that tree, then swap it in for dest."""
    # The work area sits next to dest (same file system, so the swap is two renames) under the
    # git-ignored vendor/llama.cpp.tmp/.
    work_root = dest.with_name(dest.name + ".tmp")
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=work_root))
    try:
        fresh = work / "tree"
        fresh.mkdir()
        unpack(pin, sdist, fresh)
        entries = scan_tree(fresh)
        got = tree_hash(entries)
        if got != pin.tree_sha256:
            raise FetchError(
                f"the llama.cpp unpacked from {sdist} has tree_sha256 {got}, the pin says "
                f"{pin.tree_sha256}; nothing was changed in {dest}. Is the pin's tree_sha256 "
                "right? `vendor/fetch.py --print-pin SDIST` prints it for an sdist."
            )
        write_stamp(fresh, pin, entries)
        if dest.exists() or dest.is_symlink():
            os.rename(dest, work / "old")
        os.rename(fresh, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            work_root.rmdir()
        except OSError:
            pass  # another fetch is using it, or it holds something that is not ours


@dataclass
class State:
    """What is at dest, compared with the pin."""

    present: bool
    matches: bool
    stamp: Stamp | None
    entries: list[Entry]


def inspect(pin: Pin, dest: Path) -> State:
    if not dest.is_dir():
        return State(False, False, None, [])
    entries = scan_tree(dest)
    stamp = read_stamp(dest)
    present = bool(entries)  # an empty directory holds nothing to keep
    return State(present, present and tree_hash(entries) == pin.tree_sha256, stamp, entries)


def _difference(pin: Pin, state: State, cache: Path) -> str:
    """Name what differs from the pin, from the stamp's file list or else the cached sdist."""
    stamp_entries = state.stamp.verified_entries() if state.stamp else None
    if stamp_entries is not None and tree_hash(stamp_entries) == pin.tree_sha256:
        return describe_difference(stamp_entries, state.entries)
    sdist = cache / pin.sdist_name
    if sdist.is_file() and sha256_of(sdist) == pin.sha256:
        return describe_difference(sdist_entries(pin, sdist), state.entries)
    return f"tree_sha256 is {tree_hash(state.entries)}, the pin says {pin.tree_sha256}"


def check(pin: Pin, dest: Path, cache: Path) -> str:
    """Verify dest against the pin without writing or downloading anything."""
    state = inspect(pin, dest)
    if state.matches:
        return f"{dest} matches the pin ({len(state.entries)} files)"
    if not state.present:
        raise FetchError(f"{dest} is missing; run vendor/fetch.py without --check to get it")
    raise FetchError(f"{dest} differs from the pin: {_difference(pin, state, cache)}")


def ensure(
    pin: Pin,
    dest: Path,
    cache: Path,
    index: Index,
    *,
    offline: bool = False,
    use_pip: bool = False,
    force: bool = False,
) -> str:
    """Make dest the pinned llama.cpp tree, never discarding local changes unless forced."""
    state = inspect(pin, dest)
    if state.matches and not force:
        stamp = state.stamp
        if stamp is None or stamp.fields != _pin_fields(pin) or stamp.entries != state.entries:
            try:
                write_stamp(dest, pin, state.entries)
            except OSError:
                pass  # a read-only tree that verifies is fine as it is
        return f"{dest} matches the pin ({len(state.entries)} files)"
    if state.present and not force:
        _refuse_if_modified(pin, dest, state, cache)
    install(pin, get_sdist(pin, cache, index, offline=offline, use_pip=use_pip), dest)
    return f"llama.cpp {pin.package}=={pin.version} unpacked into {dest}"


def _refuse_if_modified(pin: Pin, dest: Path, state: State, cache: Path) -> None:
    """Raise unless dest is an unmodified tree of an older pin, which is ours to replace."""
    rerun = f"python {HERE / 'fetch.py'} --force"
    if Path(os.path.abspath(dest)) != DEFAULT_DEST:
        rerun += f" --dest {dest}"
    force = (
        f"Keep your changes elsewhere and run `{rerun}` to replace it, or point "
        "LLAMABOX_LLAMA_CPP_DIR at your tree to build against it."
    )
    stamp = state.stamp
    if stamp is None:
        raise FetchError(
            f"{dest} is not the pinned llama.cpp and was not unpacked by fetch.py (no {STAMP}):"
            f" {_difference(pin, state, cache)}. {force}"
        )
    if stamp.fields.get("sha256") == pin.sha256:
        raise FetchError(f"{dest} has local changes: {_difference(pin, state, cache)}. {force}")
    old = stamp.verified_entries()
    if old is not None and old != state.entries:
        raise FetchError(
            f"{dest} holds {stamp.fields.get('package')}=={stamp.fields.get('version')} with "
            f"local changes ({describe_difference(old, state.entries)}); the pin is now "
            f"{pin.package}=={pin.version}. {force}"
        )
    # An older pin's stamp, and the tree is as it was unpacked (or an old stamp without a file
    # list): it is replaced.


def cache_dir(environ: Mapping[str, str]) -> Path:
    root = environ.get("LLAMABOX_CACHE_DIR") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamabox"
    )
    return Path(root) / "sdist"


def is_offline(environ: Mapping[str, str]) -> bool:
    return environ.get("LLAMABOX_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="default: %(default)s")
    ap.add_argument("--pin", type=Path, default=DEFAULT_PIN, help="default: %(default)s")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify only: exit 1 if not the pin")
    mode.add_argument("--force", action="store_true", help="unpack again, discarding changes")
    mode.add_argument(
        "--print-pin", type=Path, metavar="SDIST", help="print the pin lines for SDIST's tree"
    )
    args = ap.parse_args(argv)
    env = os.environ if environ is None else environ
    started = time.monotonic()
    try:
        pin = Pin.load(args.pin)
        if args.print_pin:
            entries = sdist_entries(pin, args.print_pin)
            print(f"sha256={sha256_of(args.print_pin)}\ntree_sha256={tree_hash(entries)}")
            return 0
        if args.check:
            done = check(pin, args.dest, cache_dir(env))
        else:
            done = ensure(
                pin,
                args.dest,
                cache_dir(env),
                Index.from_env(env),
                offline=is_offline(env),
                use_pip=pip_importable(),
                force=args.force,
            )
    except (FetchError, OSError, tarfile.TarError) as e:
        # OSError and TarError carry the path and the cause (permissions, a full disk, a
        # damaged cache file): enough to act on, without a traceback.
        print(f"llamabox: {e}", file=sys.stderr)
        return 1
    print(f"llamabox: {done} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
