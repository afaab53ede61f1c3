"""scripts/check_vulkan_build.sh's run on lavapipe: the tiny model's greedy tokens with all
layers on Vulkan0 (the vulkan wheel's venv) against this interpreter's own build on the CPU.

    python scripts/_vulkan_run.py VENV MODEL
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def greedy(python: str, env: dict[str, str], venv: str, model: str) -> tuple[list[int], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [python, "-m", "llamabox", "serve", "-m", model, "--port", str(port), "-c", "1024"]
    log_path = f"{venv}/serve-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*args, "-v"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=venv
        )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        body = {"prompt": "The quick brown fox", "n_predict": 16, "temperature": 0,
                "return_tokens": True, "cache_prompt": False}  # fmt: skip
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/completion",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        tokens = list(json.load(urllib.request.urlopen(req, timeout=120))["tokens"])
    finally:
        proc.terminate()
        proc.wait(30)
    with open(log_path) as log:
        return tokens, log.read()


def main() -> int:
    venv, model = sys.argv[1], sys.argv[2]
    vk, vk_log = greedy(f"{venv}/bin/python", {"GGML_VK_VISIBLE_DEVICES": "0"}, venv, model)
    cpu, _ = greedy(sys.executable, {}, venv, model)
    offload = [line.strip() for line in vk_log.splitlines() if "offloaded" in line]
    print(f"  on lavapipe: {offload[0] if offload else 'no offload line'}")
    print(f"  greedy tokens: Vulkan0 {vk[:6]}..., this build's CPU {cpu[:6]}...")
    if not offload or "3/3" not in offload[0]:
        print(vk_log[-2000:], file=sys.stderr)
        return 1
    if vk != cpu:
        print("Vulkan and CPU greedy tokens differ", file=sys.stderr)
        return 1
    print("OK: the tiny model ran on Vulkan (lavapipe) with the CPU build's greedy tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
