#!/usr/bin/env bash
# The serving benchmark of ../shared/BENCHMARKS.md in one device call: installs the carried
# wheels, writes the 8B-shaped random model, then for each server configuration starts
# `serve` in the background, runs the workloads with `lightgate bench serve` and stops it;
# ends with one table beside LightLLM's figures. Run from the repository root, with `.whl`
# and `.gpu_tok` carried (scripts/prepare_device.sh fills them here):
#
#   bash scripts/gpu_bench.sh [WORKLOAD ...]
#
# Settings (environment):
#   WORKLOADS          default "bs1 offline1000 online8rps long2k prefix16rps" (or the arguments)
#   KV_DTYPES          default "auto": one server, and one pass over WORKLOADS, per KV dtype
#                      ("auto int8" compares the two); WORKLOADS_<dtype> (e.g. WORKLOADS_int8)
#                      replaces WORKLOADS for that one
#   NOCACHE_WORKLOADS  default "prefix16rps": run again on a server with the prefix cache off
#                      (first KV dtype); "" skips it
#   CONFIGS            more servers to compare, "LABEL=FLAGS;LABEL=FLAGS" (LABEL a shell name), e.g.
#                      "no_overlap=--no-overlap-scheduling;seqs1024=--max-num-seqs 1024": each runs
#                      after the KV dtypes' servers, with the first KV dtype plus its FLAGS, over
#                      WORKLOADS_<LABEL> (or WORKLOADS)
#   TREE_<LABEL>       serve that config from another source tree (a path, e.g. an unpacked `git archive`
#                      of an earlier commit, carried as an ignored folder): A/B of two commits in one call
#   PYSPY              labels of servers to run under py-spy (a wheel of it among .whl/), e.g. "kv-auto":
#                      raw samples of every thread and the worker, in $OUT/spy_<LABEL>.txt
#   SERVE_ARGS         more flags for `serve`; BENCH_ARGS more flags for `bench serve`, and
#                      BENCH_ARGS_<LABEL> for one server's (its label, "-" as "_": BENCH_ARGS_kv_auto), e.g.
#                      CONFIGS="topp=" WORKLOADS_topp=offline1000 BENCH_ARGS_topp="--temperature 0.7 --top-p 0.9"
#                      (e.g. "--num-requests 200" to cut every workload short)
#   MODEL              default /tmp/llama8b; written by MODEL_SCRIPT (default .gpu_tok/make_random_llama.py;
#                      e.g. scripts/make_random_deepseek_v2.py, scripts/make_random_qwen2_vl.py: each takes
#                      --out and --tokenizer-dir) unless it holds a config.json already; MODEL_ARGS: more
#                      flags for that tool
#   EXTRA              more commands, "CMD;CMD" (e.g. "python3 scripts/fp8_quality.py --model /tmp/llama8b
#                      --device cuda"), run one after the other once the model is written and before any
#                      server (a command holds no ";" itself), each bounded by EXTRA_S (150) seconds, output
#                      in $OUT/extra_<i>.log
#   BUDGET_S           default 570: seconds for the whole script (a device command gets 600);
#                      a benchmark still running when only RESERVE_S (25) are left is stopped,
#                      and what it finished is kept
#   OUT                where results go (the device sets it; default ./out)
#   PYTHON, PORT       default python3, 8000; SKIP_WHEELS=1 to use PYTHON's own packages
#   PROFILE            flags for scripts/profile_gpu_step.py (e.g. "--torch-profile"), run once the
#                      model is written, output in $OUT/profile.log; PROFILE_S (180) bounds it
#   MULTITURN          flags for `bench multiturn` (e.g. "--conversations 50 --turns 6"; "-" for its
#                      defaults), run once the model is written, output in $OUT/multiturn.log
#                      and multiturn.json; MULTITURN_S (150) bounds it
#   ATTENTION_BENCH    flags for scripts/attention_bench.py ("-" for its defaults): decode and prefill
#                      attention kernel times, bf16 beside int8 KV, in $OUT/attention.log;
#                      ATTENTION_BENCH_S (120) bounds it
#   SAMPLER_BENCH      flags for scripts/sampler_bench.py ("-" for its defaults): the sampler's time per
#                      step by settings (greedy, temperature, top-p, top-k, penalties, logprobs) and
#                      batch size, in $OUT/sampler.log; SAMPLER_BENCH_S (120) bounds it
#   GPU_TESTS          test paths to run first with `pytest -m gpu` (e.g. "tests/engine"), output
#                      in $OUT/gputests.log with the slowest tests' times; GPU_TESTS_S (240) bounds
#                      them; GPU_TESTS_WORKERS (4) test processes share the GPU when pytest-xdist is
#                      there (most of a test's time is starting engines: CPU work), 1 runs them in turn;
#                      GPU_TESTS_ONLY=1: only the tests (no model, no servers), e.g. the whole GPU tier:
#                      GPU_TESTS=tests GPU_TESTS_ONLY=1 GPU_TESTS_S=540 GPU_TESTS_WORKERS=8 bash scripts/gpu_bench.sh
#
# Files under $OUT: results.json (every run and workload), bench.png (TTFT/TPOT/ITL CDFs),
# summary.txt (the tables), server.log (every server, one after the other), gpu_bench.log.
#
# Trying it on a CPU with a tiny model (what the script's own check does):
#   PYTHON=.venv/bin/python SKIP_WHEELS=1 MODEL=/tmp/tiny MODEL_ARGS="--layers 2 --hidden 64 --heads 4 \
#     --kv-heads 2 --ffn 128 --max-pos 4096" WORKLOADS="cpu1 cpu16" KV_DTYPES="auto int8" \
#     BENCH_ARGS="--num-requests 4 --output-len 4:8" OUT=/tmp/gb bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

WORKLOADS=${*:-${WORKLOADS:-bs1 offline1000 online8rps long2k prefix16rps}}
KV_DTYPES=${KV_DTYPES:-auto}
NOCACHE_WORKLOADS=${NOCACHE_WORKLOADS-prefix16rps}
SERVE_ARGS=${SERVE_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
MODEL=${MODEL:-/tmp/llama8b}
MODEL_ARGS=${MODEL_ARGS:-}
BUDGET_S=${BUDGET_S:-570}
RESERVE_S=${RESERVE_S:-25}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-8000}
OUT=${OUT:-out}
RES=$(mktemp -d /tmp/gpu_bench.XXXXXX)
mkdir -p "$OUT"
# Absolute paths: a server of another tree (TREE_<LABEL>) starts in that tree.
OUT=$(cd "$OUT" && pwd)
case $MODEL in /*) ;; *) MODEL=$PWD/$MODEL ;; esac
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
export PYTHONUNBUFFERED=1
# The tests' tiny models take the default model's tokenizer from here (its package is not carried)
[ -d .gpu_tok/tok ] && export LIGHTGATE_TEST_TOKENIZER="$PWD/.gpu_tok/tok"

left() { echo $((BUDGET_S - SECONDS)); }
say() { echo "[gpu_bench $(printf '%4d' "$SECONDS") s] $*"; }

# No `pip install -e .`: the repository and the carried wheels are on PYTHONPATH.
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { say "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PATH="/tmp/site/bin:$PATH"  # py-spy, when its wheel is carried
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
"$PYTHON" -c "import pydantic, starlette, uvicorn, httpx, tqdm" || { say "the server's packages do not import"; exit 1; }

MAKE_PID=
if [ "${GPU_TESTS_ONLY:-0}" != 1 ] && [ ! -f "$MODEL/config.json" ]; then
    say "writing the random model to $MODEL"
    # shellcheck disable=SC2086
    "$PYTHON" "${MODEL_SCRIPT:-.gpu_tok/make_random_llama.py}" --out "$MODEL" --tokenizer-dir .gpu_tok/tok $MODEL_ARGS &
    MAKE_PID=$!
fi
if [ -n "${GPU_TESTS:-}" ]; then  # the GPU test tier, while the model is written
    workers=${GPU_TESTS_WORKERS:-4}
    parallel=()
    if [ "$workers" -gt 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
        parallel=(-n "$workers")
    fi
    say "GPU tests: $GPU_TESTS (at most ${GPU_TESTS_S:-240} s, ${parallel[1]:-1} at a time)"
    # shellcheck disable=SC2086
    # -v: a line per test as it ends, so a run that `timeout` stops still says what passed
    timeout -s TERM "${GPU_TESTS_S:-240}" "$PYTHON" -m pytest -v -m gpu -p no:cacheprovider -p no:benchmark --durations=15 \
        "${parallel[@]}" $GPU_TESTS >"$OUT/gputests.log" 2>&1
    say "GPU tests: $(grep -c ' PASSED' "$OUT/gputests.log") passed, $(grep -c ' FAILED' "$OUT/gputests.log") failed," \
        "$(grep -c ' ERROR' "$OUT/gputests.log") errors, $(grep -c ' SKIPPED' "$OUT/gputests.log") skipped;" \
        "last line: $(tail -n 1 "$OUT/gputests.log")"
    grep -E " (FAILED|ERROR) " "$OUT/gputests.log" | head -n 20
    if [ "${GPU_TESTS_ONLY:-0}" = 1 ]; then
        exit 0
    fi
fi
if [ -n "$MAKE_PID" ] && ! wait "$MAKE_PID"; then
    say "writing the model failed"
    exit 1
fi
if [ -n "${MULTITURN:-}" ]; then  # multi-turn chats in one process, prefix cache on vs off
    mt_flags=$MULTITURN
    [ "$mt_flags" = "-" ] && mt_flags=
    say "multiturn: bench multiturn $mt_flags (at most ${MULTITURN_S:-150} s)"
    # shellcheck disable=SC2086
    timeout -s TERM "${MULTITURN_S:-150}" "$PYTHON" -m openai_compat.cli bench multiturn --model "$MODEL" \
        $mt_flags --json "$OUT/multiturn.json" >"$OUT/multiturn.log" 2>&1
    tail -n 4 "$OUT/multiturn.log"
fi
if [ -n "${ATTENTION_BENCH:-}" ]; then  # the attention kernels alone, bf16 beside int8 KV
    ab_flags=$ATTENTION_BENCH
    [ "$ab_flags" = "-" ] && ab_flags=
    say "attention kernels: scripts/attention_bench.py $ab_flags"
    # shellcheck disable=SC2086
    timeout -s TERM "${ATTENTION_BENCH_S:-120}" "$PYTHON" scripts/attention_bench.py $ab_flags \
        >"$OUT/attention.log" 2>&1
    grep -v '^\[{' "$OUT/attention.log" | tail -n 25
fi
if [ -n "${SAMPLER_BENCH:-}" ]; then  # the sampler alone, by settings and batch size
    sb_flags=$SAMPLER_BENCH
    [ "$sb_flags" = "-" ] && sb_flags=
    say "sampler: scripts/sampler_bench.py $sb_flags"
    # shellcheck disable=SC2086
    timeout -s TERM "${SAMPLER_BENCH_S:-120}" "$PYTHON" scripts/sampler_bench.py $sb_flags >"$OUT/sampler.log" 2>&1
    tail -n 12 "$OUT/sampler.log"
fi
if [ -n "${PROFILE:-}" ]; then  # where a step's time goes, before any server
    say "profile: scripts/profile_gpu_step.py $PROFILE (at most ${PROFILE_S:-180} s)"
    # shellcheck disable=SC2086
    timeout -s TERM "${PROFILE_S:-180}" "$PYTHON" scripts/profile_gpu_step.py "$MODEL" $PROFILE \
        >"$OUT/profile.log" 2>&1
    say "profile: $(grep -c . "$OUT/profile.log") lines in profile.log"
fi
IFS=';' read -ra extra_commands -d '' <<<"${EXTRA:-}" || true  # every line: -d '' reads to the end
for i in "${!extra_commands[@]}"; do  # the plan's other measurements, before any server
    cmd=${extra_commands[$i]}
    [ -n "${cmd// /}" ] || continue
    say "extra $i: $cmd (at most ${EXTRA_S:-150} s)"
    timeout -s TERM "${EXTRA_S:-150}" bash -c "$cmd" >"$OUT/extra_$i.log" 2>&1
    say "extra $i: exit $?; the end of extra_$i.log:"
    tail -n 15 "$OUT/extra_$i.log"
done

SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local children
    children=$(pgrep -P "$SERVER_PID" || true)
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    for pid in $children; do  # the model worker, should it outlive the server
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null
    done
    if [ -n "${SPY_PID:-}" ]; then  # py-spy writes its samples once the server is gone
        for _ in $(seq 60); do kill -0 "$SPY_PID" 2>/dev/null || break; sleep 0.5; done
        kill -INT "$SPY_PID" 2>/dev/null
        wait "$SPY_PID" 2>/dev/null
        SPY_PID=
    fi
    SERVER_PID=
}
trap stop_server EXIT

# start_server LABEL FLAGS...: in the background, log appended to $OUT/server.log; waits for /health.
start_server() {
    local label=$1
    shift
    local tree_var="TREE_${label//[^A-Za-z0-9_]/_}" pythonpath=$PYTHONPATH prefix=() dir=$PWD
    if [ -n "${!tree_var:-}" ]; then
        # `python -m` puts the working directory first on sys.path: the server starts in the tree
        dir=$(cd "${!tree_var}" && pwd)
        pythonpath="$dir${PYTHONPATH#"$PWD"}"
    fi
    if [[ " ${PYSPY:-} " == *" $label "* ]] && command -v py-spy >/dev/null; then
        # py-spy starts the server as its child: it may trace it (and the worker) where attaching is not allowed
        prefix=(py-spy record --rate 100 --format raw --threads --subprocesses --nonblocking
                -o "$OUT/spy_$label.txt" --)
    fi
    echo "===== $label: serve $* (engine from $(cd "$dir" && PYTHONPATH=$pythonpath "$PYTHON" -c \
        'import os, engine; print(os.path.dirname(os.path.dirname(engine.__file__)))' 2>&1 | tail -n 1)) =====" \
        >>"$OUT/server.log"
    # shellcheck disable=SC2086
    (cd "$dir" && PYTHONPATH=$pythonpath exec "${prefix[@]}" "$PYTHON" -m openai_compat.cli serve --model "$MODEL" \
        --port "$PORT" --no-access-log --shutdown-timeout 5 "$@" $SERVE_ARGS) \
        >>"$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    SPY_PID=
    if [ "${#prefix[@]}" -gt 0 ]; then
        SPY_PID=$SERVER_PID
        for _ in $(seq 50); do
            SERVER_PID=$(pgrep -P "$SPY_PID" | head -n 1)
            [ -n "$SERVER_PID" ] && break
            sleep 0.1
        done
        SERVER_PID=${SERVER_PID:-$SPY_PID}
    fi
    if ! "$PYTHON" - "$PORT" "$SERVER_PID" "$(($(left) - RESERVE_S))" <<'EOF'; then
import os, sys, time
import httpx
port, pid, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited")
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(f"the server was not healthy within {limit:.0f} s")
EOF
        say "server $label did not start; the end of its log:"
        tail -n 30 "$OUT/server.log"
        stop_server
        return 1
    fi
    say "server $label ready: $(grep -o 'KV cache capacity [0-9]* tokens' "$OUT/server.log" | tail -n 1)"
}

# bench LABEL WORKLOAD...: the client against the running server, stopped when the budget ends.
bench() {
    local label=$1
    shift
    local limit=$(($(left) - RESERVE_S))
    if [ "$limit" -lt 20 ]; then
        say "no time left for $label: $*"
        return 1
    fi
    local own="BENCH_ARGS_${label//-/_}"
    say "bench $label: $* ${!own:+${!own} }(at most $limit s)"
    # shellcheck disable=SC2086
    timeout -s TERM "$limit" "$PYTHON" -m openai_compat.cli bench serve --base-url "http://127.0.0.1:$PORT/v1" \
        --workload "$@" --label "$label" --json "$RES/$label.json" --no-progress $BENCH_ARGS ${!own:-}
    local status=$?
    [ "$status" = 124 ] && say "bench $label stopped at the time budget; its finished workloads are kept"
    [ -f "$RES/$label.json" ] && RUN_FILES+=("$RES/$label.json")
    return 0
}
RUN_FILES=()

first_kv=
for kv in $KV_DTYPES; do
    first_kv=${first_kv:-$kv}
    var="WORKLOADS_$kv"
    # shellcheck disable=SC2086  # the list of workloads is split into words on purpose
    start_server "kv-$kv" --kv-cache-dtype "$kv" && bench "kv-$kv" ${!var:-$WORKLOADS}
    stop_server
done
IFS=';' read -ra extra_configs <<<"${CONFIGS:-}"
for entry in "${extra_configs[@]}"; do
    [ -n "$entry" ] || continue
    label=${entry%%=*}
    flags=${entry#*=}
    var="WORKLOADS_$label"
    # shellcheck disable=SC2086  # the flags and the workloads are split into words on purpose
    start_server "$label" --kv-cache-dtype "$first_kv" $flags && bench "$label" ${!var:-$WORKLOADS}
    stop_server
done
if [ -n "$NOCACHE_WORKLOADS" ] && [ "$(left)" -gt $((RESERVE_S + 60)) ]; then
    # shellcheck disable=SC2086
    start_server "kv-$first_kv-nocache" --kv-cache-dtype "$first_kv" --no-enable-prefix-caching \
        && bench "kv-$first_kv-nocache" $NOCACHE_WORKLOADS
    stop_server
fi

# Each server's last step-log lines: where a step's time went (schedule, worker, execute, worker
# idle, loop lag, loop cpu), in steady state and while the batch drained.
say "step log, last lines of each server"
awk '/^===== /{flush(); print; n = 0; next} /steps\/s/{sub(/.*(async_engine|stats): /, ""); keep[n++ % 3] = $0}
     function flush(  i) { for (i = (n > 3 ? n - 3 : 0); i < n; i++) print "  " keep[i % 3] }
     END {flush()}' "$OUT/server.log" 2>/dev/null

say "results"
if [ "${#RUN_FILES[@]}" -gt 0 ]; then
    "$PYTHON" -m openai_compat.cli bench serve --from-json "${RUN_FILES[@]}" --compare-lightllm \
        --json "$OUT/results.json" --plot "$OUT/bench.png" | tee "$OUT/summary.txt"
else
    say "no benchmark finished"
    exit 1
fi
