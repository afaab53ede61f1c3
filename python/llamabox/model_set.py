"""The models of a server with several: ``--models-dir`` (every GGUF model in a directory) and
``--models-config`` (a TOML or JSON file naming models and their own settings).

``--models-dir DIR``: each ``*.gguf`` in DIR is a model named by its file stem, and so is each
subdirectory that holds one model (its directory name is an alias). Not models on their own:
``mmproj*.gguf`` (multimodal projectors) and the shards of a split model after the first
(``-00002-of-00003.gguf``; the first, ``-00001-of-N``, stands for the model, named without the
suffix). Hidden files are skipped, and so are subdirectories holding several models. A model in
a subdirectory with one ``mmproj*.gguf`` beside it gets that projector (``--mmproj``), as
llama-server's router pairs them.

``--models-config FILE``::

    [models.coder]                      # TOML; JSON: {"models": {"coder": {...}}}
    path = "qwen2.5-coder-1.5b.gguf"    # relative to the file's directory
    aliases = ["gpt-4o"]
    ctx-size = 8192                     # any serve flag of the model, engine, speculative
    parallel = 2                        # and sampling groups, by its long name (- or _)
    model-draft = "qwen2.5-coder-0.5b.gguf"
    temp = 0.2
    ttl = 300                           # idle seconds before an unload (default --models-ttl)
    load-on-startup = true

``models`` may also be a list of tables, each with a ``name``. Settings not given are the
command line's (or the environment's). TOML needs Python 3.11 or later (``tomllib``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from llamabox.config import ModelConfig, ServerConfig
from llamabox.types import SpeculativeConfig

if TYPE_CHECKING:
    from llamabox.cli import Flag

__all__ = ["ModelSetError", "discover_models", "model_set", "read_models_config"]

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})$")
# Per-model settings are the flags of these destinations (the server-wide ones are not).
_PER_MODEL = ("engine.", "sampling.", "spec.")
_KEYS_OWN = ("name", "path", "model", "alias", "aliases", "ttl", "load-on-startup")


class ModelSetError(ValueError):
    """The directory or the file does not describe a usable set of models."""


def _model_name(file: Path) -> str | None:
    """The model name of a GGUF file, or None when it is not a model on its own."""
    if file.name.startswith(".") or file.suffix.lower() != ".gguf":
        return None
    stem = file.stem
    if stem.lower().startswith("mmproj"):
        return None
    shard = _SHARD.match(stem)
    if shard is not None:
        return shard["stem"] if int(shard["i"]) == 1 else None
    return stem


def discover_models(directory: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, path, aliases) of each model in ``directory``, sorted by name."""
    found: list[tuple[str, Path, list[str]]] = []
    for item in sorted(directory.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_file():
            name = _model_name(item)
            if name is not None:
                found.append((name, item.resolve(), []))
        elif item.is_dir():
            inner = [(n, f) for f in sorted(item.iterdir()) if (n := _model_name(f)) is not None]
            if len(inner) == 1:
                name, file = inner[0]
                found.append((name, file.resolve(), [item.name] if item.name != name else []))
    return sorted(found, key=lambda x: x[0])


def directory_projector(model: Path) -> Path | None:
    """The projector of a model alone in a subdirectory: the one ``mmproj*.gguf`` beside it."""
    found = [
        f
        for f in model.parent.iterdir()
        if f.is_file() and f.suffix.lower() == ".gguf" and f.stem.lower().startswith("mmproj")
    ]
    return found[0].resolve() if len(found) == 1 else None


def read_models_config(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, settings) of each model the file lists, in its order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelSetError(f"cannot read {path}: {e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif sys.version_info >= (3, 11):
            import tomllib

            data = tomllib.loads(text)
        else:
            raise ModelSetError(f"{path}: TOML needs Python 3.11 or later; write it as JSON")
    except (ValueError, RecursionError) as e:  # JSONDecodeError and TOMLDecodeError are both
        raise ModelSetError(
            f"{path} is not valid {path.suffix[1:].upper() or 'TOML'}: {e}"
        ) from None
    models = data.get("models") if isinstance(data, dict) else None
    if isinstance(models, dict):
        items = list(models.items())
    elif isinstance(models, list):
        items = []
        for i, table in enumerate(models):
            if not isinstance(table, dict) or not isinstance(table.get("name"), str):
                raise ModelSetError(f"{path}: models[{i}] needs a name")
            items.append((table["name"], {k: v for k, v in table.items() if k != "name"}))
    else:
        raise ModelSetError(f"{path}: expected a 'models' table (or list) of models")
    out: list[tuple[str, dict[str, Any]]] = []
    for name, settings in items:
        if not isinstance(settings, dict):
            raise ModelSetError(f"{path}: model {name!r}: expected a table of settings")
        if not name.strip():
            raise ModelSetError(f"{path}: a model name is empty")
        out.append((name, settings))
    if not out:
        raise ModelSetError(f"{path} lists no model")
    return out


def _key(text: str) -> str:
    return text.strip().lstrip("-").replace("_", "-").lower()


def _flag_keys(flags: Iterable[Flag]) -> dict[str, tuple[Flag, bool]]:
    """Each per-model flag by its spellings without dashes, and whether the spelling means
    the flag's opposite (``mmap`` for ``--no-mmap``)."""
    out: dict[str, tuple[Flag, bool]] = {}
    for flag in flags:
        per_model = flag.dest.startswith(_PER_MODEL) and flag.dest.count(".") == 1
        if per_model or flag.dest in ("chat_template", "chat_template_file"):
            for spelling in flag.flags:
                out.setdefault(_key(spelling), (flag, False))
            for spelling in flag.opposite:
                out.setdefault(_key(spelling), (flag, True))
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError("expected a value, not true/false")
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(str(v) for v in value)
    raise ValueError(f"expected a number, a text or a list, not {type(value).__name__}")


def _value(flag: Flag, opposite: bool, value: Any, base_dir: Path) -> Any:
    if flag.action in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        given = value != opposite
        return given if flag.action == "store_true" else not given
    assert flag.parse is not None
    text = _text(value)
    if flag.metavar == "FILE":
        path = Path(text).expanduser()
        text = str(path if path.is_absolute() else base_dir / path)
    return flag.parse(text)


def _path(value: Any, base_dir: Path, what: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ModelSetError(f"{what}: 'path' must be the model file's path")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ModelSetError(f"{what}: no model file at {path}")
    return path.resolve()


def _configured(
    name: str,
    settings: Mapping[str, Any],
    base: ServerConfig,
    keys: Mapping[str, tuple[Flag, bool]],
    base_dir: Path,
    source: str,
) -> ModelConfig:
    """One model of the file: the command line's settings with the model's own over them."""
    what = f"{source}: model {name!r}"
    own = {_key(k): v for k, v in settings.items()}
    path = _path(own.get("path", own.get("model")), base_dir, what)
    aliases = own.get("aliases", own.get("alias", []))
    aliases = [aliases] if isinstance(aliases, str) else aliases
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ModelSetError(f"{what}: 'aliases' must be a list of names")
    ttl = own.get("ttl")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl)
    ):
        raise ModelSetError(f"{what}: 'ttl' must be a number of seconds")
    load_on_startup = own.get("load-on-startup", False)
    if not isinstance(load_on_startup, bool):
        raise ModelSetError(f"{what}: 'load-on-startup' must be true or false")
    sections: dict[str, dict[str, Any]] = {"engine": {}, "sampling": {}, "spec": {}}
    for key, value in own.items():
        if key in _KEYS_OWN:
            continue
        if key not in keys:
            raise ModelSetError(
                f"{what}: unknown setting {key!r} (per model: path, aliases, ttl, "
                "load-on-startup, and the serve flags of the model, engine, speculative and "
                "sampling groups)"
            )
        flag, opposite = keys[key]
        try:
            parsed = _value(flag, opposite, value, base_dir)
        except ValueError as e:
            raise ModelSetError(f"{what}: {key}: {e}") from None
        if flag.dest == "chat_template_file":
            try:
                parsed = Path(parsed).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelSetError(f"{what}: {key}: cannot read {parsed}: {e}") from None
            sections["engine"]["chat_template"] = parsed
        elif flag.dest == "chat_template":
            sections["engine"]["chat_template"] = parsed
        else:
            section, _, field = flag.dest.partition(".")
            sections[section][field] = parsed
    draft = sections["spec"].get("draft_model")
    if draft is not None and not Path(draft).is_file():
        raise ModelSetError(f"{what}: no draft model file at {draft}")
    spec: SpeculativeConfig = msgspec.structs.replace(base.engine.speculative, **sections["spec"])
    engine = msgspec.structs.replace(
        base.engine, model=str(path), speculative=spec, **sections["engine"]
    )
    return ModelConfig(
        name=name,
        aliases=list(aliases),
        engine=engine,
        sampling=msgspec.structs.replace(base.sampling, **sections["sampling"]),
        ttl=float(ttl) if ttl is not None else None,
        load_on_startup=load_on_startup,
    )


def model_set(
    base: ServerConfig,
    flags: Sequence[Flag],
    *,
    models_dir: str | None,
    models_config: str | None,
    model_given: bool,
) -> list[ModelConfig]:
    """Every model of the server, the default first: the ``-m`` model when ``model_given``
    (``base``'s engine, alias and sampling), then the config file's in its order, then the
    directory's by name (a file already listed is not listed again). Names must be unique."""
    models: list[ModelConfig] = []
    if model_given:
        models.append(
            ModelConfig(
                name=base.model_name,
                engine=base.engine,
                sampling=base.sampling,
                load_on_startup=True,  # named on the command line: loaded at start-up
            )
        )
    if models_config is not None:
        path = Path(models_config)
        keys = _flag_keys(flags)
        for name, settings in read_models_config(path):
            models.append(_configured(name, settings, base, keys, path.resolve().parent, str(path)))
    if models_dir is not None:
        listed = {Path(m.engine.model).resolve() for m in models}
        taken = {name for m in models for name in (m.name, *m.aliases)}
        directory = Path(models_dir).resolve()
        found = discover_models(directory)
        taken |= {name for name, _, _ in found}
        for name, file, aliases in found:
            if file in listed:
                continue
            aliases = [a for a in aliases if a not in taken]  # a directory's name, if free
            taken.update(aliases)
            engine = msgspec.structs.replace(base.engine, model=str(file))
            projector = directory_projector(file) if file.parent != directory else None
            if projector is not None and engine.mmproj is None:
                engine = msgspec.structs.replace(engine, mmproj=str(projector))
            models.append(
                ModelConfig(name=name, aliases=aliases, engine=engine, sampling=base.sampling)
            )
        if not models:
            raise ModelSetError(f"no GGUF model in {models_dir}")
    owner: dict[str, ModelConfig] = {}
    for model in models:
        for name in (model.name, *model.aliases):
            other = owner.setdefault(name, model)
            if other is not model:
                raise ModelSetError(
                    f"two models are named {name!r}: {other.engine.model} and "
                    f"{model.engine.model} (give one another name in --models-config)"
                )
    return models
