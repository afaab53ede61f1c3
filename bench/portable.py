"""The portable cpu wheel (ggml's CPU variant chosen at run time) against the native build.

Two servers on the same model and settings: one from this interpreter (a local build, compiled
for this CPU with GGML_NATIVE=ON and ggml statically inside ``_core``), one from the venv the
portable wheel is installed in (scripts/check_portable_wheel.sh makes one; or ``python -m venv
V && V/bin/pip install dist/portable/llamabox-*.whl``). Both are up all along; ``llamabox bench``
runs against each in turn at every concurrency, alternating, and the table gives output tokens/s,
TTFT p50 and the ratio portable / native.

    python bench/portable.py --portable-python /tmp/v/bin/python --threads 2 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_pair, log, pair_args, ratio_table  # noqa: E402
from servers import free_port, start_server, stop_server, wait_ready  # noqa: E402


def variant(python: str) -> str:
    code = "import llamabox._core as c; print(c.system_info()['cpu_variant'] or 'native, static')"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--portable-python", required=True, help="python of the portable wheel's venv")
    args = pair_args(ap, threads=2)
    n_par = max(int(c) for c in args.concurrency.split(","))
    common = ["serve", "-m", args.model, "-np", str(n_par), "-c", str(1024 * n_par),
              "-t", str(args.threads), "-tb", str(args.threads)]  # fmt: skip
    pythons = {"native": sys.executable, "portable": args.portable_python}
    variants = {name: variant(py) for name, py in pythons.items()}
    log(f"CPU code: native {variants['native']}, portable {variants['portable']}")
    servers = {}
    try:
        for name, python in pythons.items():
            port = free_port()
            cmd = [python, "-m", "llamabox", *common, "--port", str(port)]
            servers[name] = start_server(f"llamabox-{name}", cmd, port, "portable-bench")
            asyncio.run(wait_ready(servers[name]))
        runs: dict[str, list[dict[str, Any]]] = {"native": [], "portable": []}
        for rep in range(args.repeat):
            for name in ("native", "portable") if rep % 2 == 0 else ("portable", "native"):
                runs[name].append(bench_pair(servers[name].url, args))
                log(f"{name} pass {rep + 1} done")
    finally:
        for s in servers.values():
            stop_server(s)
    rows = ratio_table(runs, "native", "portable", args.concurrency)
    print(json.dumps({"bench": "portable", "threads": args.threads, "variants": variants,
                      "rows": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
