"""What reading a streamed answer back into content, reasoning and tool calls costs.

The chat parser (llama.cpp's ``common_chat_parse``, driven by ``csrc/chat_format.cpp``) parses
the whole answer so far each time text arrives, as llama-server does, so the cost per token grows
with the answer. This pushes answers of growing length into a parser a few characters (about a
token) at a time and reports the cost per push at the end of the answer and in all, next to the
time a token takes to decode (``--tok-per-s``, what the server measures for the model). The
answers end in a tool call, with tools offered: without tools, and without a reasoning section
in the template, no parser runs at all.

    python bench/chat_parse.py --template Qwen-Qwen2.5-7B-Instruct.jinja --lengths 1000,4000,16000

No llama-server column: its parser is the same code, run the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.chat import WEATHER_TOOL, family_model  # noqa: E402

from llamabox import _core  # noqa: E402

PIECE = 4  # characters per push: about one token of English text


def answer(n_chars: int, with_call: bool) -> str:
    words = "The weather in Paris is mild today, with a light breeze from the west. "
    text = (words * (n_chars // len(words) + 1))[:n_chars]
    if with_call:
        call = {"name": "get_weather", "arguments": {"unit": "c"}}
        text += "\n<tool_call>\n" + json.dumps(call) + "\n</tool_call>"
    return text


def run(engine: _core.Engine, n_chars: int, tools: bool) -> tuple[float, float, int]:
    inputs: dict[str, object] = {"messages": [{"role": "user", "content": "Weather?"}]}
    if tools:
        inputs["tools"] = [WEATHER_TOOL]
    render = engine.apply_chat(json.dumps(inputs))
    text = answer(n_chars, tools)
    parser = _core.ChatParser(render)
    pieces = [text[i : i + PIECE] for i in range(0, len(text), PIECE)]
    last_ms = 0.0
    started = time.perf_counter()
    for k, piece in enumerate(pieces):
        t = time.perf_counter()
        parser.push(piece, k == len(pieces) - 1)
        last_ms = (time.perf_counter() - t) * 1e3
    total_ms = (time.perf_counter() - started) * 1e3
    if tools:
        assert len(parser.message.tool_calls) == 1, "the call was not parsed"
    return last_ms, total_ms, len(pieces)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--template", default="Qwen-Qwen2.5-7B-Instruct.jinja")
    ap.add_argument("--lengths", default="1000,4000,16000", help="answer lengths, in characters")
    ap.add_argument("--tok-per-s", type=float, default=30.0, help="decode speed to compare with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = _core.EngineParams()
        params.model_path = str(family_model(Path(tmp) / "m.gguf", args.template))
        params.n_ctx = 512
        engine = _core.Engine(params)
        token_ms = 1e3 / args.tok_per_s
        print(f"template {args.template}; a token decodes in {token_ms:.1f} ms")
        print("| answer chars | pushes | last push ms | all ms | mean ms/push | last / token |")
        print("| --- | --- | --- | --- | --- | --- |")
        for n in (int(x) for x in args.lengths.split(",")):
            last, total, pushes = run(engine, n, tools=True)
            print(f"| {n} | {pushes} | {last:.3f} | {total:.1f} | {total / pushes:.3f} "
                  f"| {last / token_ms:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
