"""Resident memory of a lightgate server on a GGUF file, and what its conversion costs.

    python scripts/gguf_memory.py llama1b.Q4_K_M.gguf llama1b.Q8_0.gguf [--kv-cache-memory-gb 1]

For each file: `lightgate serve --model FILE` starts on an empty cache directory (so the time
to its first answer includes the conversion), answers one 8-token completion, and the memory
of each of its processes is read from /proc (VmRSS and PSS, as scripts/cpu_vs_llama_server.py
reads them); then it stops and starts again on the now filled cache (the time to ready without
a conversion). Printed per file: its size, the cache entry's size, both start times, and each
process's RSS / PSS and its peak RSS (VmHWM: while loading) in MiB (the worker, which holds the weights and the KV cache, is the
largest child).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_cpu_vs() -> object:
    spec = importlib.util.spec_from_file_location("cpu_vs", REPO / "scripts" / "cpu_vs_llama_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_vs: object = _load_cpu_vs()


def _complete(url: str) -> None:
    with urllib.request.urlopen(f"{url}/models", timeout=60) as response:
        model = json.load(response)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()


Memory = tuple[int, str, float, float, float]  # pid, role, RSS, PSS, peak RSS (MiB)


def _process_memory(pid: int) -> list[Memory]:
    """The server's and each descendant's memory."""
    out = []
    for p in cpu_vs._descendants(pid):  # type: ignore[attr-defined]
        rss = cpu_vs._kib(f"/proc/{p}/status", "VmRSS:") / 1024  # type: ignore[attr-defined]
        pss = cpu_vs._kib(f"/proc/{p}/smaps_rollup", "Pss:") / 1024  # type: ignore[attr-defined]
        peak = cpu_vs._kib(f"/proc/{p}/status", "VmHWM:") / 1024  # type: ignore[attr-defined]
        out.append((p, "server" if p == pid else "child", rss, pss, peak))
    return out


def _serve(model: Path, cache: Path, args: argparse.Namespace) -> tuple[float, list[Memory]]:
    """Seconds until the first answer, and the processes' memory after it."""
    url = f"http://127.0.0.1:{args.port}/v1"
    cmd = [sys.executable, "-m", "openai_compat.cli", "serve", "--model", str(model), "--cache-dir", str(cache),
           "--host", "127.0.0.1", "--port", str(args.port), "--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
    print("+", " ".join(cmd), flush=True)
    start = time.monotonic()
    with open(cache.parent / f"{model.stem}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cpu_vs.env())  # type: ignore[attr-defined]
    try:
        cpu_vs.wait_ready(proc, url, args.start_timeout)  # type: ignore[attr-defined]
        _complete(url)
        seconds = time.monotonic() - start
        time.sleep(2.0)  # let the allocator settle after the request
        return seconds, _process_memory(proc.pid)
    finally:
        cpu_vs.stop(proc)  # type: ignore[attr-defined]


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--start-timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    for model in args.models:
        work = Path(tempfile.mkdtemp(prefix="gguf-memory-"))
        cache = work / "cache"
        try:
            first, _ = _serve(model, cache, args)
            second, processes = _serve(model, cache, args)
            mib = 1 << 20
            print(f"{model.name}: file {model.stat().st_size / mib:.0f} MiB, cache entry "
                  f"{_tree_bytes(cache) / mib:.1f} MiB, first answer {first:.1f} s (with the conversion), "
                  f"{second:.1f} s (cached), KV cache {args.kv_cache_memory_gb} GiB")
            for pid, role, rss, pss, peak in processes:
                print(f"  {role} {pid}: RSS {rss:.0f} MiB, PSS {pss:.0f} MiB, peak RSS {peak:.0f} MiB")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
