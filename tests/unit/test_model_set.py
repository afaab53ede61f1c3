"""--models-dir and --models-config: which files are models, their names, their own settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llamabox.cli import UsageError, parse_serve_args
from llamabox.model_set import discover_models

pytestmark = pytest.mark.unit


def _gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    _gguf(d / "llama-3.2-1b-Q4_K_M.gguf")
    _gguf(d / "mmproj-F16.gguf")  # a projector: not a model
    _gguf(d / "big-00001-of-00002.gguf")  # a split model: its first shard stands for it
    _gguf(d / "big-00002-of-00002.gguf")
    _gguf(d / "gemma-3-4b" / "gemma-3-4b-it-Q8_0.gguf")  # one model in a subdirectory
    _gguf(d / "gemma-3-4b" / "mmproj-gemma.gguf")
    _gguf(d / "two" / "x.gguf")  # two models in one subdirectory: skipped
    _gguf(d / "two" / "y.gguf")
    _gguf(d / ".hidden.gguf")
    (d / "notes.txt").write_text("not a model")
    return d


def test_a_directory_lists_the_models_in_it(models_dir: Path) -> None:
    found = [(name, path.name, aliases) for name, path, aliases in discover_models(models_dir)]
    assert found == [
        ("big", "big-00001-of-00002.gguf", []),
        ("gemma-3-4b-it-Q8_0", "gemma-3-4b-it-Q8_0.gguf", ["gemma-3-4b"]),
        ("llama-3.2-1b-Q4_K_M", "llama-3.2-1b-Q4_K_M.gguf", []),
    ]


def test_models_dir_serves_them_all_the_first_by_name_the_default(models_dir: Path) -> None:
    c = parse_serve_args(["--models-dir", str(models_dir), "-c", "2048", "--temp", "0.5"], {})
    assert c.models is not None
    assert [m.name for m in c.models] == ["big", "gemma-3-4b-it-Q8_0", "llama-3.2-1b-Q4_K_M"]
    assert c.alias == "big" and c.engine == c.models[0].engine
    assert all(m.engine.n_ctx == 2048 and m.sampling.temperature == 0.5 for m in c.models)
    assert not any(m.load_on_startup for m in c.models)
    assert (c.models_max, c.models_ttl) == (4, 0.0)
    # the projector beside a model in its own directory is its --mmproj; a loose one is no one's
    projectors = {m.name: m.engine.mmproj and Path(m.engine.mmproj).name for m in c.models}
    assert projectors == {
        "big": None,
        "gemma-3-4b-it-Q8_0": "mmproj-gemma.gguf",
        "llama-3.2-1b-Q4_K_M": None,
    }
    env = {"LLAMA_ARG_MODELS_DIR": str(models_dir), "LLAMA_ARG_MODELS_MAX": "1"}
    c = parse_serve_args(["--models-ttl", "30"], env)
    assert c.models is not None and len(c.models) == 3
    assert (c.models_max, c.models_ttl) == (1, 30.0)


def test_with_m_its_model_is_the_default_and_loads_at_start_up(
    models_dir: Path, tmp_path: Path
) -> None:
    mine = _gguf(tmp_path / "mine.gguf")
    c = parse_serve_args(["-m", str(mine), "-a", "main", "--models-dir", str(models_dir)], {})
    assert c.models is not None
    assert [m.name for m in c.models][:2] == ["main", "big"] and c.alias == "main"
    assert c.models[0].load_on_startup
    # -m naming a file of the directory: listed once (named as -m names it)
    c = parse_serve_args(["-m", str(models_dir / "big-00001-of-00002.gguf"), "--models-dir",
                          str(models_dir)], {})  # fmt: skip
    assert c.models is not None
    assert [m.name for m in c.models] == [
        "big-00001-of-00002", "gemma-3-4b-it-Q8_0", "llama-3.2-1b-Q4_K_M",
    ]  # fmt: skip
    # without either: one model, as before
    assert parse_serve_args(["-m", str(mine)], {}).models is None


CONFIG_TOML = """
[models.coder]
path = "coder.gguf"
aliases = ["gpt-4o", "code"]
ctx-size = 8192
parallel = 2
model-draft = "draft.gguf"
temp = 0.2
top_k = 10
no-mmap = true
ttl = 300
load-on-startup = true

[models.chat]
model = "sub/chat.gguf"
"""


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_a_toml_config_gives_each_model_its_own_settings(tmp_path: Path) -> None:
    _gguf(tmp_path / "coder.gguf")
    _gguf(tmp_path / "draft.gguf")
    _gguf(tmp_path / "sub" / "chat.gguf")
    config = tmp_path / "models.toml"
    config.write_text(CONFIG_TOML)
    c = parse_serve_args(["--models-config", str(config), "-c", "1024", "--temp", "0.9"], {})
    assert c.models is not None
    coder, chat = c.models
    assert coder.name == "coder" and coder.aliases == ["gpt-4o", "code"]
    assert coder.engine.model == str(tmp_path / "coder.gguf")
    assert (coder.engine.n_ctx, coder.engine.n_parallel, coder.engine.use_mmap) == (8192, 2, False)
    assert coder.engine.speculative.draft_model == str(tmp_path / "draft.gguf")
    assert (coder.sampling.temperature, coder.sampling.top_k) == (0.2, 10)
    assert coder.ttl == 300 and coder.load_on_startup
    assert chat.engine.model == str(tmp_path / "sub" / "chat.gguf")
    assert (chat.engine.n_ctx, chat.sampling.temperature, chat.ttl) == (1024, 0.9, None)
    assert c.alias == "coder"


def test_a_json_config_and_a_list_of_models(tmp_path: Path, models_dir: Path) -> None:
    _gguf(tmp_path / "a.gguf")
    config = tmp_path / "models.json"
    models = [{"name": "first", "path": "a.gguf", "n_gpu_layers": "all", "mmap": False}]
    config.write_text(json.dumps({"models": models}))
    c = parse_serve_args(["--models-config", str(config), "--models-dir", str(models_dir)], {})
    assert c.models is not None
    assert [m.name for m in c.models] == [
        "first", "big", "gemma-3-4b-it-Q8_0", "llama-3.2-1b-Q4_K_M",
    ]  # fmt: skip
    assert c.models[0].engine.n_gpu_layers == -1 and not c.models[0].engine.use_mmap


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"m": {"path": "a.gguf", "port": 9000}}, "unknown setting 'port'"),
        ({"m": {"path": "a.gguf", "api-key": "k"}}, "unknown setting 'api-key'"),
        ({"m": {"path": "a.gguf", "ctx-size": "big"}}, "ctx-size: expected an integer"),
        ({"m": {"path": "a.gguf", "ctx-size": -5}}, "ctx-size: expected an integer >= 0"),
        ({"m": {"path": "a.gguf", "no-mmap": "yes"}}, "expected true or false"),
        ({"m": {"path": "a.gguf", "ttl": "long"}}, "'ttl' must be a number"),
        ({"m": {"path": "missing.gguf"}}, "no model file at"),
        ({"m": {}}, "'path' must be"),
        ({"m": {"path": "a.gguf", "model-draft": "nope.gguf"}}, "no draft model file"),
        ({"m": {"path": "a.gguf", "aliases": [1]}}, "'aliases' must be a list"),
        ({"m": {"path": "a.gguf"}, "n": {"path": "a.gguf", "aliases": ["m"]}}, "named 'm'"),
        ({}, "lists no model"),
        ([], "lists no model"),
        ("x", "expected a 'models' table"),
        ([{"path": "a.gguf"}], r"models\[0\] needs a name"),
    ],
)
def test_config_errors_name_the_model_and_the_setting(
    tmp_path: Path, models: object, message: str
) -> None:
    _gguf(tmp_path / "a.gguf")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": models}))
    with pytest.raises(UsageError, match=message) as e:
        parse_serve_args(["--models-config", str(config)], {})
    assert str(e.value).startswith("--models-config")


def test_directory_and_name_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        parse_serve_args(["--models-dir", str(tmp_path / "missing")], {})
    with pytest.raises(UsageError, match="no GGUF model in"):
        parse_serve_args(["--models-dir", str(tmp_path)], {})
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_serve_args(["--models-config", str(tmp_path / "bad.json")], {})
    with pytest.raises(UsageError, match="cannot read"):
        parse_serve_args(["--models-config", str(tmp_path / "none.json")], {})
    _gguf(tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="names the -m model"):
        parse_serve_args(["--models-dir", str(tmp_path), "-a", "name"], {})
    other = _gguf(tmp_path / "other" / "x.gguf")
    with pytest.raises(UsageError, match="two models are named 'x'"):
        parse_serve_args(["-m", str(other), "--models-dir", str(tmp_path)], {})
