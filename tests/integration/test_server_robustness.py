"""Bad input against a real server: every request gets a 4xx (501 for a disabled feature) in the
error shape of its API, never a 5xx or a dropped connection, and the server goes on serving: a
long stream running meanwhile ends with its full token count, and nothing fails in the log.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

N_VOCAB = 32000  # the tiny model's (llama SPM vocabulary)
BACKGROUND_TOKENS = 800  # of a slot context of 1024
M = [{"role": "user", "content": "Hello"}]
CHAT = {"messages": M, "max_tokens": 4}
CMPL = {"prompt": "Hello", "max_tokens": 4}
NATIVE = {"prompt": "Hello", "n_predict": 4}
OLLAMA = {"prompt": "Hello", "stream": False, "options": {"num_predict": 4}}
OLLAMA_CHAT = {"messages": M, "stream": False, "options": {"num_predict": 4}}
GENERATE = ("/v1/chat/completions", "/v1/completions", "/completion", "/api/generate")

TOOL: dict[str, Any] = {"type": "function", "function": {"name": "f", "parameters": {}}}
TOOL_USE = {"type": "tool_use", "id": "1", "name": "f", "input": {}}


def NAMED(name: str) -> dict[str, Any]:  # noqa: N802 (read as a constant in the table)
    return {"type": "function", "function": {"name": name}}


def USER_BLOCK(block: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
    return {"role": "user", "content": [block]}


Body = dict[str, Any] | list[Any] | str | bytes
Case = tuple[str, Body]


def _on_all(field: str, *values: Any) -> list[Case]:
    """A sampling field on every generation endpoint (Ollama's under ``options``)."""
    out: list[Case] = []
    for value in values:
        out += [
            ("/v1/chat/completions", {**CHAT, field: value}),
            ("/v1/completions", {**CMPL, field: value}),
            ("/completion", {**NATIVE, field: value}),
        ]
        ollama = {"top_k", "top_p", "min_p", "typical_p", "temperature", "seed", "repeat_last_n"}
        if field in ollama:
            out.append(("/api/generate", {**OLLAMA, "options": {field: value, "num_predict": 4}}))
    return out


def _grammar(grammar: str) -> list[Case]:
    return [
        ("/v1/chat/completions", {**CHAT, "grammar": grammar}),
        ("/v1/completions", {**CMPL, "grammar": grammar}),
        ("/completion", {**NATIVE, "grammar": grammar}),
    ]


def _schema(schema: Any) -> list[Case]:
    return [
        ("/v1/completions", {**CMPL, "json_schema": schema}),
        ("/completion", {**NATIVE, "json_schema": schema}),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_object", "schema": schema}},
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
        ),
        ("/api/generate", {**OLLAMA, "format": schema}),
        ("/api/chat", {**OLLAMA_CHAT, "format": schema}),
    ]


def _raw(path: str, body: bytes) -> Case:
    return (path, body)


_DEEP_GROUPS = "root ::= " + "(" * 20000 + '"a"' + ")" * 20000
_RULE_CHAIN = (
    "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(300_000)) + 'r300000 ::= "a"'
)


def _ref_chain(n: int) -> dict[str, Any]:
    """``$defs`` d0 .. dn, each an object whose one property refers to the next."""
    defs: dict[str, Any] = {
        f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}}
        for i in range(n)
    }
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def _tool_call(arguments: str) -> list[dict[str, Any]]:
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [*M, {"role": "assistant", "tool_calls": [call]}, {"role": "user", "content": "ok"}]


BAD: list[Case] = [
    # -- bodies that are not JSON, or not UTF-8, or not an object
    *[(path, b"{oops") for path in (*GENERATE, "/api/chat", "/v1/embeddings", "/tokenize")],
    *[(path, b"") for path in ("/v1/chat/completions", "/detokenize", "/api/chat")],
    *[(path, b'{"prompt": "x"} trailing') for path in ("/v1/completions", "/api/generate")],
    *[(path, b"NaN") for path in ("/v1/completions", "/completion")],
    *[(path, body) for path in ("/v1/chat/completions", "/infill") for body in ([1, 2], "x", 5)],
    _raw("/tokenize", b'{"content": "\xff\xfe"}'),
    _raw("/tokenize", b'{"content": "\xc0\xaf"}'),  # overlong encoding
    _raw("/tokenize", b'{"content": "\xe2\x82"}'),  # truncated sequence
    _raw("/v1/completions", b'{"prompt": "\xff", "max_tokens": 1}'),
    _raw("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff"}]}'),
    _raw("/v1/embeddings", b'{"input": ["ok", "\xff"]}'),
    _raw("/api/generate", b'{"prompt": "\xff"}'),
    _raw("/api/chat", b'{"messages": [{"role": "user", "content": "\xe2\x82"}]}'),
    _raw("/v1/completions", b'{"prompt": "x", "json_schema": {"type": "string", "\xff": 1}}'),
    _raw("/api/generate", b'{"prompt": "x", "format": {"\xff": 1}}'),
    _raw("/tokenize", b'{"content": "\\ud800"}'),  # a lone surrogate
    _raw("/v1/completions", b'{"prompt": "x", "stop": ["\\udc00"]}'),
    _raw("/completion", b'{"prompt": "x", "grammar": "root ::= \\"\\ud800\\""}'),
    _raw("/completion", b'{"prompt": "x", "temperature": 1e999}'),
    _raw("/v1/chat/completions", b'{"messages": [], "temperature": Infinity}'),
    _raw("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 1e999}}'),
    _raw("/v1/completions", b'{"prompt": "x", "json_schema": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    _raw(
        "/api/chat",
        b'{"messages": [{"role": "user", "content": "x"}], "format": '
        + b'{"a":' * 3000
        + b"1"
        + b"}" * 3000
        + b"}",
    ),
    _raw(
        "/v1/chat/completions",
        b'{"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"type": "function", '
        b'"function": {"name": "f", "arguments": "{}"}, "x": '
        + b'{"a":' * 3000
        + b"1"
        + b"}" * 3000
        + b"}]}]}",
    ),
    # -- wrong JSON types, at every level
    ("/v1/chat/completions", {"messages": "Hello"}),
    ("/v1/chat/completions", {"messages": [5]}),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "x"}}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["x"]}]}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    ),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}]}),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": 5}}]}
            ]
        },
    ),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}),
    ("/v1/chat/completions", {**CHAT, "stream_options": [True]}),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "yes"}}),
    ("/v1/chat/completions", {**CHAT, "model": 5}),
    ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}),
    ("/v1/chat/completions", {**CHAT, "stop": 5}),
    ("/v1/chat/completions", {**CHAT, "stop": [1, 2]}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": ["x"]}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": "x"}}),
    ("/v1/chat/completions", {**CHAT, "logit_bias": [[5, 1, 2]]}),
    ("/v1/chat/completions", {**CHAT, "grammar": 5}),
    ("/v1/completions", {**CMPL, "prompt": {"text": "x"}}),
    ("/v1/completions", {**CMPL, "prompt": None}),
    ("/v1/completions", {**CMPL, "prompt": [1.5]}),
    ("/v1/completions", {**CMPL, "prompt": [True]}),
    ("/v1/completions", {**CMPL, "prompt": [[[1]]]}),
    ("/v1/completions", {**CMPL, "prompt": [1, "a"]}),
    ("/v1/completions", {**CMPL, "prompt": ["a", [1]]}),
    ("/v1/completions", {**CMPL, "echo": 1}),
    ("/v1/completions", {**CMPL, "suffix": 5}),
    ("/completion", {**NATIVE, "prompt": 5}),
    ("/completion", {**NATIVE, "prompt": [[1]]}),
    ("/completion", {**NATIVE, "n_predict": "5"}),
    ("/completion", {**NATIVE, "n_predict": 5.5}),
    ("/completion", {**NATIVE, "n_predict": True}),
    ("/completion", {**NATIVE, "temperature": "hot"}),
    ("/completion", {**NATIVE, "return_tokens": "yes"}),
    ("/v1/embeddings", {"input": {"text": "x"}}),
    ("/v1/embeddings", {"input": [None]}),
    ("/v1/embeddings", {"input": [[1, "a"]]}),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}),
    ("/v1/embeddings", {}),
    ("/tokenize", {"content": 5}),
    ("/tokenize", {"content": "x", "add_special": "yes"}),
    ("/tokenize", {}),
    ("/detokenize", {"tokens": "1 2"}),
    ("/detokenize", {"tokens": [1.5]}),
    ("/detokenize", {"tokens": [[1]]}),
    ("/detokenize", {"tokens": [1, "a"]}),
    ("/apply-template", {"messages": "x"}),
    ("/apply-template", {"messages": [{"content": "x"}]}),
    ("/infill", {"input_prefix": 5}),
    ("/infill", {"input_extra": "x"}),
    ("/api/generate", {**OLLAMA, "prompt": 5}),
    ("/api/generate", {**OLLAMA, "options": [1]}),
    ("/api/generate", {**OLLAMA, "options": {"stop": "x"}}),
    ("/api/generate", {**OLLAMA, "options": {"temperature": "hot"}}),
    ("/api/generate", {**OLLAMA, "images": "x"}),
    ("/api/generate", {**OLLAMA, "raw": "yes"}),
    ("/api/chat", {**OLLAMA_CHAT, "messages": "x"}),
    ("/api/chat", {**OLLAMA_CHAT, "messages": [5]}),
    ("/api/chat", {**OLLAMA_CHAT, "messages": [{"role": "user", "content": ["x"]}]}),
    ("/api/chat", {**OLLAMA_CHAT, "messages": [{"content": "x"}]}),
    ("/v1/chat/completions", {**CHAT, "messages": _tool_call("{not json")}),
    ("/v1/chat/completions", {**CHAT, "messages": _tool_call("[" * 30000 + "]" * 30000)}),
    ("/apply-template", {"messages": _tool_call('{"a":' * 30000 + "1" + "}" * 30000)}),
    # -- roles, messages and content parts
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]}),
    ("/apply-template", {"messages": [{"role": "narrator", "content": "x"}]}),
    ("/api/chat", {**OLLAMA_CHAT, "messages": [{"role": "wizard", "content": "x"}]}),
    ("/api/chat", {**OLLAMA_CHAT, "messages": [{"role": "", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"max_tokens": 4}),
    ("/apply-template", {"messages": []}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "no type"}]}]}),
    ("/apply-template", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
    ),
    (
        "/api/chat",
        {**OLLAMA_CHAT, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
    ),
    ("/api/generate", {**OLLAMA, "images": ["aGk="]}),
    # -- numbers: huge, negative, out of the native types' range
    *_on_all("temperature", 1e39, 1e300),
    *_on_all("top_p", 1.5, -0.5, 1e300),
    *_on_all("min_p", 1.5, -0.5),
    *_on_all("typical_p", 0, -1),
    *_on_all("top_k", 2**31, 2**40, -(2**40), 2**64),
    *_on_all("seed", 2**63, 2**64 - 1, -(2**63) - 1, 2**70),
    *_on_all("repeat_last_n", -2, 2**31, 2**40),
    *_on_all("repeat_penalty", -1, 0, 1e39),
    *_on_all("presence_penalty", 1e39, -1e300),
    *_on_all("frequency_penalty", 1e39),
    ("/api/generate", {**OLLAMA, "options": {"repeat_penalty": 0}}),
    (
        "/api/generate",
        {**OLLAMA, "options": {"presence_penalty": 1e300, "frequency_penalty": -1e300}},
    ),
    ("/api/chat", {**OLLAMA_CHAT, "options": {"seed": -(2**64)}}),
    ("/api/chat", {**OLLAMA_CHAT, "options": {"top_k": 2**40}}),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -2}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2**31}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2**64}),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**40}),
    ("/v1/completions", {**CMPL, "max_tokens": 2**40}),
    ("/completion", {**NATIVE, "n_predict": 0}),
    ("/completion", {**NATIVE, "n_predict": 2**40}),
    ("/completion", {"prompt": "Hello", "max_tokens": 2**63}),
    ("/api/generate", {**OLLAMA, "options": {"num_predict": 0}}),
    ("/api/generate", {**OLLAMA, "options": {"num_predict": 2**40}}),
    *[("/v1/chat/completions", {**CHAT, "n": n}) for n in (0, -1, 5, 2**70)],
    *[("/v1/completions", {**CMPL, "n": n}) for n in (0, 9, 2**31)],
    ("/v1/completions", {**CMPL, "seed": 2**63 - 1, "n": 2, "max_tokens": 2**40}),
    *[("/completion", {**NATIVE, "n_probs": n}) for n in (-1, 101, 2**40)],
    *[
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": n})
        for n in (-1, 21, 2**40)
    ],
    *[("/v1/completions", {**CMPL, "logprobs": n}) for n in (-1, 21, 2**40)],
    # -- logit_bias
    *[
        (path, {**body, "logit_bias": bias})
        for path, body in (
            ("/v1/chat/completions", CHAT),
            ("/v1/completions", CMPL),
            ("/completion", NATIVE),
        )
        for bias in (
            {str(N_VOCAB): 1},
            {"-1": 1},
            {"2147483648": 1},
            {"99999999999999999999999": 1},
            [[N_VOCAB, 1]],
            [[-5, 1]],
            [[2**63, 1]],
            {"5": 1e39},
            {"5": -1e300},
            [[5, "x"]],
        )
    ],
    # -- token prompts
    *[
        (path, {**body, "prompt": prompt})
        for path, body in (("/v1/completions", CMPL), ("/completion", NATIVE))
        for prompt in ([-1], [N_VOCAB], [1, 2**31], [2**63], [2**64], [])
    ],
    ("/v1/completions", {**CMPL, "prompt": [[]]}),
    ("/v1/completions", {**CMPL, "prompt": [[1], []]}),
    ("/v1/completions", {**CMPL, "prompt": [[1, 2], [3, N_VOCAB]]}),
    ("/v1/completions", {**CMPL, "prompt": [[1], [-7]], "echo": True}),
    ("/v1/completions", {**CMPL, "prompt": [1, 2], "suffix": "x"}),
    ("/v1/completions", {**CMPL, "prompt": ["a"] * 300, "max_tokens": 1}),
    ("/v1/completions", {**CMPL, "prompt": "word " * 3000}),
    ("/completion", {**NATIVE, "prompt": [1, 2, -3, "text"]}),
    ("/api/generate", {**OLLAMA, "prompt": "word " * 3000}),
    # -- stops
    *[
        (path, {**body, "stop": ["a"] * 17})
        for path, body in (("/v1/completions", CMPL), ("/completion", NATIVE))
    ],
    ("/v1/chat/completions", {**CHAT, "stop": ["x" * 2000]}),
    ("/api/generate", {**OLLAMA, "options": {"stop": ["s"] * 40}}),
    ("/api/generate", {**OLLAMA, "options": {"stop": ["s" * 5000]}}),
    # -- grammars: syntax errors, undefined rules, left recursion, no root, too deep
    *_grammar('root ::= "a'),
    *_grammar("root ::= [a-"),
    *_grammar('root ::= ("a"'),
    *_grammar("root ::= undefined-rule"),
    *_grammar('root ::= root "a" | "b"'),
    *_grammar('root ::= x\nx ::= y "a"\ny ::= x | "b"'),
    *_grammar('other ::= "a"'),
    *_grammar('root ::= "\\q"'),
    *_grammar('root ::= "a"{99999999}'),
    *_grammar('root ::= "a"{5,2}'),  # llama.cpp would expand it into 2^64 rules
    *_grammar('root ::= "a"{ 3 , 0 }'),
    *_grammar("root ::= " + '"a"{0,2000} ' * 200),  # a few bytes asking for gigabytes
    *_grammar(_DEEP_GROUPS),
    ("/v1/completions", {**CMPL, "grammar": _RULE_CHAIN}),
    (
        "/v1/chat/completions",
        {**CHAT, "grammar": 'root ::= "a"', "json_schema": {"type": "string"}},
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
    ),
    # grammars valid, but that no token can ever satisfy: found on the first token
    *_grammar("root ::= <[99999999]>"),
    *[(path, {**body, "logit_bias": {"2": False}}) for path, body in _grammar('root ::= "a"')],
    # -- JSON schemas
    *_schema({"type": "nonsense"}),
    *_schema({"$ref": "#/nope"}),
    *_schema({"$ref": "https://example.com/schema.json"}),
    *_schema({"properties": 5}),
    *_schema({"type": "integer", "minimum": "x"}),
    *_schema({"enum": []}),
    *_schema([1, 2]),
    *_schema(5),
    *_schema("not a schema"),
    *_schema({"allOf": [{"$ref": "#/allOf/0"}]}),  # a $ref to itself: recursion without end
    *_schema(
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    ),
    *_schema({"type": "string", "minLength": 5, "maxLength": 2}),  # {5,2}: 2^64 rules
    *_schema({"type": "string", "pattern": "^a{3,1}$"}),
    ("/v1/completions", {**CMPL, "json_schema": _ref_chain(5000)}),  # deep recursion
    ("/v1/completions", {**CMPL, "json_schema": _ref_chain(20000)}),
    ("/v1/completions", {**CMPL, "json_schema": "{not json"}),
    ("/v1/completions", {**CMPL, "json_schema": '{"type": "nonsense"}'}),
    # -- response_format
    *[
        ("/v1/chat/completions", {**CHAT, "response_format": rf})
        for rf in (
            {"type": "nonsense"},
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {}},
            {"type": "json_schema", "json_schema": {"schema": 5}},
            {},
            "json_object",
            5,
        )
    ],
    # -- embeddings
    ("/v1/embeddings", {"input": []}),
    ("/v1/embeddings", {"input": ""}),
    ("/v1/embeddings", {"input": ["ok", ""]}),
    ("/v1/embeddings", {"input": [[]]}),
    ("/v1/embeddings", {"input": [[1], []]}),
    ("/v1/embeddings", {"input": [-1]}),
    ("/v1/embeddings", {"input": [[1, N_VOCAB]]}),
    ("/v1/embeddings", {"input": [2**40]}),
    ("/v1/embeddings", {"input": [[1] * 600]}),  # more than a physical batch
    ("/v1/embeddings", {"input": ["x"] * 300}),
    ("/v1/embeddings", {"input": "word " * 3000}),
    ("/api/embed", {"input": []}),
    ("/api/embed", {"input": [""]}),
    ("/api/embed", {"input": "word " * 3000, "truncate": False}),
    ("/api/embed", {"input": 5}),
    # -- text utilities
    *[("/detokenize", {"tokens": tokens}) for tokens in ([-1], [N_VOCAB], [1, 2**31], [2**63])],
    (
        "/apply-template",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
    ),
    (
        "/infill",
        {"input_prefix": "def f(", "input_suffix": "):"},
    ),  # the tiny model has no FIM tokens
    ("/api/generate", {**OLLAMA, "suffix": "x"}),
    # -- slot files: this server has no --slot-save-path (501), and the route's own checks
    ("/slots/0?action=save", {"filename": "a.bin"}),
    ("/slots/0?action=restore", {"filename": "../../etc/passwd"}),
    ("/slots/0?action=dump", {}),
    ("/slots/0", {}),
    ("/slots/zero?action=erase", {}),
    ("/slots/99?action=erase", {}),
    ("/slots/-1?action=erase", {}),
    ("/slots/0?action=save", b"{oops"),
    ("/slots/0?action=save", {"filename": 5}),
    # -- tools and reasoning on chat (this model's template is llama.cpp's built-in fallback)
    ("/v1/chat/completions", {**CHAT, "tools": "x"}),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL] * 500}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "always"}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function"}}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": NAMED("other")}),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "grammar": 'root ::= "a"'}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "functions": [TOOL["function"]]}),
    ("/v1/chat/completions", {**CHAT, "functions": [TOOL["function"]], "function_call": "x"}),
    ("/v1/chat/completions", {**CHAT, "parallel_tool_calls": "yes"}),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "extreme"}),
    ("/v1/chat/completions", {**CHAT, "reasoning_format": "verbose"}),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": [1]}),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": "no"}}),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x", "tool_calls": [5]}]}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": 5}}]},
    ),
    # -- Responses
    ("/v1/responses", {}),
    ("/v1/responses", {"input": 5}),
    ("/v1/responses", {"input": []}),
    ("/v1/responses", {"input": [5]}),
    ("/v1/responses", {"input": [{"type": "nope"}]}),
    ("/v1/responses", {"input": [{"role": "robot", "content": "x"}]}),
    ("/v1/responses", {"input": [{"type": "function_call", "call_id": "1"}]}),
    ("/v1/responses", {"input": [{"type": "function_call_output", "output": "x"}]}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
    ("/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}),
    ("/v1/responses", {"input": "x", "max_output_tokens": -5}),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "yaml"}}}),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "schema": 5}}}),
    ("/v1/responses", {"input": "x", "reasoning": {"effort": "max"}}),
    ("/v1/responses", {"input": "x", "stream": "yes"}),
    ("/v1/responses", b"{oops"),
    # -- Messages
    ("/v1/messages", {"messages": M}),
    ("/v1/messages", {"max_tokens": 0, "messages": M}),
    ("/v1/messages", {"max_tokens": 4, "messages": []}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "x"}]}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [USER_BLOCK({"type": "image", "source": {}})]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [USER_BLOCK(TOOL_USE)]}),
    ("/v1/messages", {"max_tokens": 4, "messages": M, "tools": [{"name": "t", "type": "bash_1"}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": M, "tool_choice": {"type": "tool"}}),
    ("/v1/messages", {"max_tokens": 4, "messages": M, "tool_choice": {"type": "maybe"}}),
    ("/v1/messages", {"max_tokens": 4, "messages": M, "thinking": {"type": "lots"}}),
    ("/v1/messages", {"max_tokens": 4, "messages": M, "stop_sequences": "x"}),
    ("/v1/messages", {"max_tokens": 4, "messages": M, "system": 5}),
    ("/v1/messages/count_tokens", {}),
    ("/v1/messages/count_tokens", {"messages": "x"}),
    ("/v1/messages", b"[1, 2"),
    # -- models: llama-server's router's control (this server has one model), keep_alive
    *[
        (path, body)
        for path in ("/models/load", "/models/unload")
        for body in (
            {},
            {"model": 5},
            {"model": ""},
            {"model": None},
            {"model": "no-such-model"},
            {"model": ["tiny"]},
            [1],
            "tiny",
            b"{oops",
            b"",
        )
    ],  # fmt: skip
    ("/models/load", {"model": "tiny"}),  # loaded already
    ("/models/unload", {"model": "tiny"}),  # the one model stays loaded
    ("/api/generate", {**OLLAMA, "keep_alive": "soon"}),
    ("/api/generate", {**OLLAMA, "keep_alive": "5m3"}),
    ("/api/generate", {**OLLAMA, "keep_alive": [1]}),
    ("/api/generate", {**OLLAMA, "keep_alive": "9" * 100}),
    ("/api/chat", {**OLLAMA_CHAT, "keep_alive": {"x": 1}}),
    ("/api/embed", {"input": "x", "keep_alive": True}),
    # -- rerank (this server does not rerank: 501 once the body is well formed) and LoRA
    ("/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("/rerank", {"query": "q", "texts": ["a"]}),
    ("/v1/rerank", {"query": "q"}),
    ("/v1/rerank", {"query": "q", "documents": "a"}),
    ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}),
    ("/v1/rerank", {"query": ["q"], "documents": ["a"]}),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "2"}),
    ("/v1/rerank", b"{"),
    ("/lora-adapters", [{"id": 0, "scale": 1.0}]),
    ("/lora-adapters", {"id": 0}),
    *_on_all("lora", [{"id": 0, "scale": 1.0}], [{"id": -1, "scale": 1.0}], "x", [{"id": 0}]),
    ("/v1/chat/completions", {**CHAT, "lora": [{"id": 0, "scale": float("nan")}]}),
]

# Edge cases that are fine (they once took the server down or answered 500): they must work.
ACCEPTED: list[Case] = [
    ("/v1/completions", {**CMPL, "logit_bias": {"²": 1, "--5": 2, "١": 1, "": 3}}),  # text keys
    ("/v1/completions", {**CMPL, "logit_bias": [["hello", False], [7, True]]}),
    ("/v1/completions", {**CMPL, "seed": 2**63 - 1, "n": 2}),
    ("/completion", {**NATIVE, "seed": -(2**63), "top_k": -5, "temperature": -1e300}),
    ("/v1/completions", {**CMPL, "stop": [""], "max_tokens": 2}),
    ("/tokenize", {"content": "x" * 200_000}),
    ("/slots/1?action=erase", {}),  # an idle slot's cache dropped; the others serve on
    ("/tokenize", {"content": "<s></s>\u0000\U0001f600", "with_pieces": True}),
    ("/detokenize", {"tokens": list(range(0, N_VOCAB, 7))}),
    ("/detokenize", {"tokens": []}),
    ("/api/embed", {"input": "word " * 3000}),  # truncated to fit
    ("/v1/completions", {**CMPL, "grammar": "root ::= " + "(" * 200 + '"a"' + ")" * 200}),
    ("/v1/completions", {**CMPL, "grammar": 'root ::= [a-z]{0,2000} "."{3,3}'}),
    ("/v1/chat/completions", {**CHAT, "messages": _tool_call('{"a": {"b": [1, {"c": null}]}}')}),
    ("/v1/completions", {**CMPL, "json_schema": _ref_chain(1000)}),
    (
        "/v1/completions",
        {
            **CMPL,
            "json_schema": {"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}}
            | {"$ref": "#/$defs/t"},
        },
    ),
    ("/v1/completions", {**CMPL, "json_schema": {"anyOf": [{"allOf": [{"$ref": "#/anyOf/0"}]}]}}),
]


def _error_shape(path: str, r: httpx.Response) -> str:
    """The error message, after checking the body is the error shape of ``path``'s API."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        message = body["error"]
    else:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["type"], str) and error["type"], body
        message = error["message"]
    assert isinstance(message, str) and message, body
    return message


def _post(http: httpx.Client, path: str, body: Body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, content=json.dumps(body).encode())


def _sse_events(raw: bytes) -> list[str]:
    """The data of each event. (Not ``iter_lines()``: it also splits at U+2028 and the like, which
    JSON leaves unescaped in the random model's text.)"""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].decode().split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


class Background:
    """Long streaming completions, back to back, until told to stop; each must come out whole."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.started = threading.Event()
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, http: httpx.Client) -> None:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": BACKGROUND_TOKENS,
            "ignore_eos": True,
            "temperature": 0.7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        raw = b""
        with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                self.failures.append(f"status {r.status_code}: {r.read()!r}")
                return
            for part in r.iter_bytes():
                raw += part
                self.started.set()
        events = _sse_events(raw)
        if events[-1:] != ["[DONE]"]:
            self.failures.append(f"no [DONE]: {events[-2:]}")
            return
        chunks = [json.loads(e) for e in events[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        usage = chunks[-1].get("usage") or {}
        if finishes[-1:] != ["length"] or usage.get("completion_tokens") != BACKGROUND_TOKENS:
            self.failures.append(f"cut short: {finishes[-1:]}, {usage}")
            return
        self.done += 1

    def _run(self) -> None:
        try:
            with self.server.http() as http:
                while not self.stop.is_set():
                    self._one(http)
        except Exception as e:  # reported by the test, not lost in the thread
            self.failures.append(repr(e))
        finally:
            self.started.set()

    def __enter__(self) -> Background:
        self.thread.start()
        assert self.started.wait(60) and not self.failures, self.failures
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(180)
        assert not self.thread.is_alive(), "the background stream hung"


# ChatML, with tool calls whose arguments it walks as objects (llama.cpp then parses them).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.tool_calls or [] %}"
    "{{ c.function.name }}({% for k in c.function.arguments %}{{ k }}={% endfor %}"
    "{{ c.function.arguments | tojson }}){% endfor %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    flags = ["-np", "4", "-c", "4096", "-a", "tiny", "--embeddings", "--pooling", "mean"]
    flags += ["--max-body-size", "8M", "--chat-template", TEMPLATE]
    with start_server(tiny_model_path, *flags) as server:
        yield server


def _assert_healthy(server: ServerProcess) -> None:
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-5000:]}"
    with server.http() as http:
        assert http.get("/health").status_code == 200
        out = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3}).json()
        assert out["choices"][0]["message"]["content"] is not None
        assert out["usage"]["completion_tokens"] >= 1
        deadline = time.monotonic() + 10
        while any(slot["is_processing"] for slot in http.get("/slots").json()):
            assert time.monotonic() < deadline, "a slot is still busy"
            time.sleep(0.05)
    log = server.log()
    for sign in (
        "Traceback",
        "unhandled error",
        "request failed",
        "response failed",
        "step failed",
        "sampling failed",
        "llama_decode failed",
    ):
        assert sign not in log, f"{sign!r} in the server log:\n{log[-5000:]}"


def test_bad_input_gets_4xx_and_disturbs_nothing(server: ServerProcess) -> None:
    unexpected: list[str] = []
    with Background(server) as background, server.http() as http:
        for path, body in BAD:
            shown = (body if isinstance(body, bytes) else json.dumps(body))[:120]
            try:
                r = _post(http, path, body)
            except httpx.HTTPError as e:
                if server.proc.poll() is not None:
                    pytest.fail(f"{path} {shown!r} killed the server:\n{server.log()[-3000:]}")
                unexpected.append(f"{path} {shown!r}: {e!r}")
                continue
            if not (400 <= r.status_code < 500 or r.status_code == 501):
                unexpected.append(f"{path} {shown!r}: {r.status_code} {r.text[:300]}")
                continue
            try:
                _error_shape(path, r)
            except AssertionError as e:
                unexpected.append(f"{path} {shown!r}: not the error shape: {e}")
            assert http.get("/health").status_code == 200
        for path, body in ACCEPTED:
            r = _post(http, path, body)
            if r.status_code != 200:
                unexpected.append(f"{path} (accepted case): {r.status_code} {r.text[:300]}")
    assert not unexpected, "\n".join(unexpected)
    assert not background.failures, background.failures
    assert background.done >= 1
    _assert_healthy(server)


def test_error_messages_say_what_is_wrong(server: ServerProcess) -> None:
    cases: list[tuple[str, Body, int, str]] = [
        ("/tokenize", b'{"content": "\xff"}', 400, "not valid UTF-8"),
        (
            "/v1/completions",
            b'{"prompt": "x", "json_schema": ' + b"[" * 3000 + b"]" * 3000 + b"}",
            400,
            "nested too deeply",
        ),
        ("/v1/completions", {**CMPL, "seed": 2**64 - 1}, 400, "seed"),
        ("/v1/completions", {**CMPL, "prompt": [1, 2**40]}, 400, "out of range"),
        ("/detokenize", {"tokens": [2**40]}, 400, "out of range"),
        ("/completion", {**NATIVE, "top_k": 2**40}, 400, "top_k"),
        ("/completion", {**NATIVE, "repeat_penalty": 0}, 400, "repeat_penalty"),
        (
            "/api/generate",
            {**OLLAMA, "options": {"frequency_penalty": 1e300}},
            400,
            "frequency_penalty",
        ),
        ("/v1/completions", {**CMPL, "logit_bias": {"5": 1e39}}, 400, "logit_bias"),
        ("/v1/completions", {**CMPL, "grammar": _DEEP_GROUPS}, 400, "nests groups"),
        ("/v1/completions", {**CMPL, "grammar": _RULE_CHAIN}, 400, "rules"),
        ("/v1/completions", {**CMPL, "grammar": "root ::= <[99999999]>"}, 400, "no token"),
        ("/v1/completions", {**CMPL, "grammar": 'root ::= "a"{5,2}'}, 400, "minimum is more"),
        (
            "/v1/completions",
            {**CMPL, "json_schema": {"allOf": [{"$ref": "#/allOf/0"}]}},
            400,
            "$ref",
        ),
        ("/v1/completions", {**CMPL, "json_schema": _ref_chain(20000)}, 400, "objects and arrays"),
        ("/v1/embeddings", {"input": ["x"] * 300}, 400, "at once"),
        ("/apply-template", {"messages": _tool_call("[" * 300 + "]" * 300)}, 400, "nest 300 deep"),
        ("/v1/embeddings", {"input": ["ok", ""]}, 400, "empty"),
        (
            "/api/chat",
            {**OLLAMA_CHAT, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "wizard",
        ),
    ]
    with server.http() as http:
        prompt = http.post("/apply-template", json={"messages": _tool_call('{"a": 1}')}).json()
        assert "f(a=" in prompt["prompt"]  # the template walks the arguments as an object
        for path, body, status, needle in cases:
            r = _post(http, path, body)
            assert r.status_code == status, (path, r.text)
            assert needle in _error_shape(path, r), (path, r.text)
    _assert_healthy(server)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/completion"])
def test_grammar_left_without_a_token_mid_stream_is_an_error_event(
    server: ServerProcess, path: str
) -> None:
    """Found after the headers went out: the stream ends with an invalid_request_error event."""
    body = {**(CHAT if path == "/v1/chat/completions" else CMPL), "stream": True}
    body |= {"grammar": 'root ::= "a"', "logit_bias": {"2": False}, "max_tokens": 8}
    with server.http() as http:
        with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = _sse_events(r.read())
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "invalid_request_error" and "no token" in error["message"]
    _assert_healthy(server)


def test_grammar_that_cannot_finish_ends_at_max_tokens(server: ServerProcess) -> None:
    with server.http() as http:
        for grammar in ('root ::= "a" root', "root ::= [a-z]{200}"):
            out = http.post("/v1/completions", json={**CMPL, "grammar": grammar, "max_tokens": 6})
            assert out.status_code == 200, out.text
            [choice] = out.json()["choices"]
            assert choice["finish_reason"] == "length" and choice["text"]
            assert out.json()["usage"]["completion_tokens"] == 6
            chat = http.post(
                "/v1/chat/completions", json={**CHAT, "grammar": grammar, "max_tokens": 6}
            )
            assert chat.json()["choices"][0]["finish_reason"] == "length"


def test_grammar_with_ignore_eos_ends_when_the_grammar_completes(server: ServerProcess) -> None:
    with server.http() as http:
        for body in (
            {**CMPL, "grammar": 'root ::= "yes" | "no"'},
            {**CMPL, "json_schema": {"const": "done"}},
            {
                **CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"enum": [1, 2]}},
                },
            },
        ):
            r = http.post(
                "/v1/chat/completions" if "messages" in body else "/v1/completions",
                json={**body, "ignore_eos": True, "max_tokens": 100},
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert choice["finish_reason"] == "stop", choice
            assert text.strip() in ("yes", "no", '"done"', "1", "2"), text
