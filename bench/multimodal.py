"""Images (--mmproj): ``llamabox serve`` versus ``llama-server`` on the same model and projector.

    python bench/multimodal.py [--model GGUF] [--threads 1] [--repeat 3] [--images 4]
                               [--vision-layers 6] [--vision-embd 384] [--image-size 448]

No real vision model can be downloaded here, so the projector is the test fixture's: a random
``gemma3`` projector (SigLIP-style tower + Gemma 3's pooling and projection) whose projection
width is the model's hidden size (Gemma 3 270M by default), written to ``bench/results/`` with
the tower sized by the flags, so that encoding costs something real (the defaults: 448x448
pixels in 14-pixel patches, 6 layers of width 384: about a second on one core, 256 image tokens
after pooling by 2). Both servers get ``-np 4 -c 8192 -t T -tb T --mmproj FILE``; requests go to
``/completion`` with llama.cpp's ``{"prompt_string", "multimodal_data"}`` prompt on both.

For each server and repeat (alternating which goes first):

- **TTFT cold**: a streamed request with an image neither server has seen (time to the first
  streamed token; median of ``--images`` distinct images);
- **TTFT repeat**: the same request again (both servers reuse the slot's cached prefix, image
  included);
- **TTFT same image, new text**: the image after a different text, so no cached prefix covers
  it: llamabox takes its projected embeddings from ``--max-projected-cache``, llama-server
  encodes it again;
- **text while images encode**: one client streams text (a process of its own) while another
  sends ``--images`` requests with new images one after the other; the stream's median gap
  before, its largest gap and its tokens/s during; then the same images again after a new
  text (llamabox: decoded from the projected cache, not encoded), and the stream's largest
  gap then, which is what the image's decode alone costs the stream.

The last line is JSON (``{"bench": "multimodal", ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.tiny_mmproj import make_test_png, make_tiny_gemma3_mmproj  # noqa: E402

from common import RESULTS_DIR, Streamer, build_llama_tools, log, median, model_path  # noqa: E402
from servers import SERVERS, free_port, pair_commands, start_both, stop_server  # noqa: E402

PROMPT = (
    "<start_of_turn>user\n{text}{marker}What is in the image?<end_of_turn>\n<start_of_turn>model\n"
)


def image_b64(seed: int, side: int) -> str:
    return base64.b64encode(make_test_png(None, side, side, seed)).decode()


def media_marker(url: str) -> str:
    """The server's media marker from /props (llama-server's is random per process)."""
    return str(httpx.get(url + "/props", timeout=30).json().get("media_marker", "<__media__>"))


def ttft(client: httpx.Client, url: str, text: str, image: str) -> float:
    """Seconds from sending a streamed image request to its first token."""
    prompt = PROMPT.format(text=text, marker=media_marker(url))
    body = {
        "prompt": {"prompt_string": prompt, "multimodal_data": [image]},
        "n_predict": 2,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.monotonic()
    with client.stream("POST", url + "/completion", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("content"):
                return time.monotonic() - t0
    raise RuntimeError(f"{url}: no token streamed")


def one_run(url: str, seeds: list[int], side: int) -> dict[str, Any]:
    images = [image_b64(s, side) for s in seeds]
    with httpx.Client(timeout=300) as client:
        cold, repeat, moved = [], [], []
        for i, image in enumerate(images):
            text = f"Image {seeds[i]}. "
            cold.append(ttft(client, url, text, image))
            repeat.append(ttft(client, url, text, image))
            moved.append(ttft(client, url, f"Another look, {seeds[i]}: ", image))

        # text while new images encode
        stream_body = {
            "prompt": "Once upon a time",
            "n_predict": 100000,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        streamer = Streamer(url, "/completion", stream_body)
        time.sleep(2.0)
        t_heavy = time.monotonic()
        busy = [image_b64(seed + 10_000, side) for seed in seeds]
        for image in busy:  # new images: encoded, then decoded
            ttft(client, url, "Busy. ", image)
        t_mid = time.monotonic()
        for image in busy:  # the same after new text: decoded only (the projected cache)
            ttft(client, url, "Busy again. ", image)
        t_done = time.monotonic()
        time.sleep(0.5)
        times = streamer.stop()
    gaps = [(b - a, b) for a, b in zip(times, times[1:], strict=False)]
    before = [g for g, t in gaps if t < t_heavy]
    during = [g for g, t in gaps if t_heavy <= t <= t_mid]
    decode_only = [g for g, t in gaps if t_mid < t <= t_done]
    if not before or not during or not decode_only:
        raise RuntimeError("the stream ended too soon")
    return {
        "ttft_cold_ms": round(1e3 * statistics.median(cold), 1),
        "ttft_repeat_ms": round(1e3 * statistics.median(repeat), 1),
        "ttft_same_image_new_text_ms": round(1e3 * statistics.median(moved), 1),
        "stream_normal_gap_ms": round(1e3 * statistics.median(before), 1),
        "stream_largest_gap_ms": round(1e3 * max(during), 1),
        "stream_largest_gap_cached_ms": round(1e3 * max(decode_only), 1),
        "stream_tok_s_during": round(len(during) / (t_mid - t_heavy), 1),
        "images_s": round(t_mid - t_heavy, 2),
    }


async def amain(args: argparse.Namespace) -> int:
    model = model_path(args.model)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    proj = make_tiny_gemma3_mmproj(
        RESULTS_DIR / "bench-gemma3-mmproj.gguf",
        n_embd_text=args.text_embd,
        image_size=args.image_size,
        patch_size=args.patch_size,
        n_embd=args.vision_embd,
        n_head=max(1, args.vision_embd // 64),
        n_ff=args.vision_embd * 4,
        n_layer=args.vision_layers,
        n_merge=args.merge,
    )
    llama_server = build_llama_tools()["llama-server"]
    ports = {name: free_port() for name in SERVERS}
    common = ["-m", str(model), "--mmproj", str(proj), "-np", "4", "-c", "8192"]
    common += ["-t", str(args.threads), "-tb", str(args.threads)]
    cmds = pair_commands(llama_server, common, ports)
    servers = await start_both(cmds, ports, "multimodal")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    try:
        for rep in range(args.repeat):
            order = list(SERVERS) if rep % 2 == 0 else list(reversed(SERVERS))
            seeds = [1000 * (rep + 1) + i for i in range(args.images)]
            for name in order:
                result = await asyncio.to_thread(one_run, servers[name].url, seeds, args.side)
                runs[name].append(result)
                log(f"rep {rep + 1}/{args.repeat} {name:12}: {result}")
    finally:
        for server in servers.values():
            stop_server(server)

    keys = list(runs[SERVERS[0]][0])
    summary = {name: {k: median([r[k] for r in runs[name]]) for k in keys} for name in SERVERS}
    print()
    print(f"{'metric':28} | {'llamabox':>10} | {'llama-server':>12} | ratio")
    print("-" * 66)
    for k in keys:
        a, b = summary["llamabox"][k], summary["llama-server"][k]
        print(f"{k:28} | {a:10.1f} | {b:12.1f} | {a / b if b else float('nan'):.2f}")
    print(
        f"(medians of {args.repeat} runs of {args.images} images each; projector: "
        f"{args.image_size}px / {args.patch_size}px patches, {args.vision_layers} layers of "
        f"{args.vision_embd}, pooled by {args.merge}; images {args.side}x{args.side} PNG)"
    )
    print(
        json.dumps(
            {"bench": "multimodal", "threads": args.threads, "summary": summary, "runs": runs}
        )
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF model (default: llamabox's default, Gemma 3 270M)")
    ap.add_argument("--text-embd", type=int, default=640, help="the model's hidden size")
    ap.add_argument("--threads", type=int, default=1, help="-t and -tb of both servers")
    ap.add_argument("--repeat", type=int, default=3, help="runs per server")
    ap.add_argument("--images", type=int, default=4, help="distinct images per run")
    ap.add_argument("--side", type=int, default=640, help="the test images' width and height")
    ap.add_argument("--image-size", type=int, default=448, help="the projector's input size")
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--vision-embd", type=int, default=384)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--merge", type=int, default=2, help="gemma3 pooling kernel")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
