"""lightgate beside llama.cpp's llama-server on the CPU: same GGUF file, same client, one run.

    python scripts/cpu_vs_llama_server.py                        # default model, Q4_1 as shipped
    python scripts/cpu_vs_llama_server.py --quant Q8_0 --num-requests 2
    python scripts/cpu_vs_llama_server.py --model random-llama --quant Q4_K_M --workload cpu1

The GGUF file comes from scripts/bench_gguf.py (kept in --work-dir, reused when there) and
llama-server from scripts/build_llama_server.sh (unless --llama-server names a binary). The
two servers run one after the other on the same port, each started, measured with
`lightgate bench serve --workload ...` (streaming /v1/completions, random token-id prompts,
greedy, `ignore_eos`) and stopped; just before it stops, the resident memory of the server
and all its child processes is read from /proc (VmRSS and PSS, each summed over them). llama-server runs with `-np 16 -t
THREADS -c 8192` (16 slots of 512 tokens, enough for cpu16's longest request), lightgate
with `lightgate serve --model FILE.gguf` and its defaults. The table prints per workload:
output tok/s, TPOT p50, TTFT p50, requests lost (failed of sent), then the servers' memory;
the bench client's own result files are left in --work-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve import WORKLOADS  # noqa: E402  (this checkout's, as the servers run it)

QUANTS = {"default": ("Q4_1", "Q4_0", "Q8_0"), "random-llama": ("Q4_K_M", "Q8_0")}
SERVERS = ("llama-server", "lightgate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(QUANTS), default="default")
    parser.add_argument("--quant", default=None, help="default: Q4_1 (as shipped), Q4_0, Q8_0; "
                        "random-llama: Q4_K_M (default), Q8_0")
    parser.add_argument("--layers", type=int, default=16, help="random-llama's depth (default 16: 1B-class)")
    parser.add_argument("--workload", nargs="+", default=["cpu1", "cpu16"], metavar="NAME")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per workload instead of the workload's own count")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server's -t (default: all cores)")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--llama-server", default=None, metavar="PATH", help="a built llama-server binary")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "lightgate" / "cpu-vs-llama-server")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to load")
    args = parser.parse_args(argv)
    args.quant = args.quant or QUANTS[args.model][0]
    if args.quant not in QUANTS[args.model]:
        parser.error(f"--quant for --model {args.model} must be one of {', '.join(QUANTS[args.model])}")
    unknown = [name for name in args.workload if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}: one of {', '.join(WORKLOADS)}")
    if args.num_requests is not None and args.num_requests < 1:
        parser.error("--num-requests must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if not 0 < args.port < 65536:
        parser.error("--port must be 1..65535")
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def env() -> dict[str, str]:
    """This checkout first on the import path, also in the servers' spawned workers."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH", "")) if p)
    return out


def gguf_file(args: argparse.Namespace) -> Path:
    name = "smollm2-135m" if args.model == "default" else f"random-llama-{args.layers}l"
    path = args.work_dir / f"{name}.{args.quant}.gguf"
    if not path.exists():
        cmd = [sys.executable, str(REPO / "scripts" / "bench_gguf.py"), args.model, "--quant", args.quant,
               "--out", str(path)]
        if args.model == "random-llama":
            cmd += ["--layers", str(args.layers)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env())
    return path


def llama_server_binary(args: argparse.Namespace) -> str:
    if args.llama_server:
        return args.llama_server
    out = subprocess.run(["bash", str(REPO / "scripts" / "build_llama_server.sh")], check=True,
                         stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def server_command(server: str, args: argparse.Namespace, model: Path) -> list[str]:
    if server == "llama-server":
        return [llama_server_binary(args), "-m", str(model), "--host", "127.0.0.1", "--port", str(args.port),
                "-np", "16", "-t", str(args.threads), "-c", "8192"]
    return [sys.executable, "-m", "openai_compat.cli", "serve", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(args.port)]


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    """Until GET /v1/models answers 200 (llama-server answers 503 while it loads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, Pss) of a process and every descendant, summed, in MiB. RSS counts pages the
    processes share once per process; PSS splits them, so its sum is what the tree holds."""
    pids = _descendants(pid)
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss / 1024, pss / 1024


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(server: str, args: argparse.Namespace, model: Path) -> tuple[dict[str, Any], tuple[float, float]]:
    """The bench client's run against one server, and the server's resident MiB after it."""
    url = f"http://127.0.0.1:{args.port}/v1"
    result = args.work_dir / f"{model.stem}.{server}.json"
    log = args.work_dir / f"{model.stem}.{server}.log"
    cmd = server_command(server, args, model)
    print("+", " ".join(cmd), f"> {log} 2>&1 &", flush=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env())
    try:
        wait_ready(proc, url, args.start_timeout)
        bench = [sys.executable, "-m", "openai_compat.cli", "bench", "serve", "--base-url", url,
                 "--workload", *args.workload, "--label", server, "--json", str(result), "--no-progress"]
        if args.num_requests is not None:
            bench += ["--num-requests", str(args.num_requests)]
        print("+", " ".join(bench), f"  # load average {os.getloadavg()[0]:.1f}", flush=True)
        result.unlink(missing_ok=True)
        # the client exits non-zero when a request failed: lost requests are a result here
        code = subprocess.run(bench, env=env()).returncode
        memory = tree_memory_mib(proc.pid)
    finally:
        stop(proc)
    if not result.exists():
        raise RuntimeError(f"the bench client exited with {code} and wrote no {result}")
    with open(result) as f:
        return json.load(f)["runs"][-1], memory


def table(runs: dict[str, tuple[dict[str, Any], tuple[float, float]]], workloads: list[str]) -> str:
    head = "| server |"
    rule = "| --- |"
    for name in workloads:
        head += f" {name} output tok/s | {name} TPOT p50 ms | {name} TTFT p50 ms | {name} lost |"
        rule += " ---: | ---: | ---: | ---: |"
    lines = [head + " RSS / PSS MiB |", rule + " ---: |"]
    for server, (run, (rss, pss)) in runs.items():
        row = f"| {server} |"
        for name in workloads:
            m = run["workloads"][name]["metrics"]
            tpot = m["tpot_ms"]["p50"]
            row += (f" {m['output_throughput']:.1f} | {'-' if tpot is None else f'{tpot:.1f}'} |"
                    f" {m['ttft_ms']['p50']:.0f} | {m['failed']} of {m['failed'] + m['completed']} |")
        lines.append(row + f" {rss:.0f} / {pss:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = gguf_file(args)
    print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB)", flush=True)
    runs = {server: measure(server, args, model) for server in args.servers}
    print()
    print(table(runs, args.workload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
