#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp that a pinned llama-cpp-python sdist
# vendors, as a benchmark reference (scripts/cpu_vs_llama_server.py). It is never a runtime
# dependency of lightgate. The build lands in a cache directory outside the repo and is kept:
# a second call finds the binary and only prints its path (the last line of stdout).
#
# usage: scripts/build_llama_server.sh [--version X.Y.Z] [--cache-dir DIR] [--jobs N]
set -euo pipefail

# Pinned so that every comparison is against the same llama.cpp; it builds with gcc 12 and
# cmake 3.25.
version="0.3.36"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/lightgate"
jobs="$(nproc)"

usage() {
    echo "usage: $0 [--version X.Y.Z] [--cache-dir DIR] [--jobs N]" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --version) [[ $# -ge 2 ]] || usage; version="$2"; shift 2 ;;
        --cache-dir) [[ $# -ge 2 ]] || usage; cache_root="$2"; shift 2 ;;
        --jobs) [[ $# -ge 2 ]] || usage; jobs="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "bad --version: $version" >&2; exit 2; }
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "bad --jobs: $jobs" >&2; exit 2; }

out="$cache_root/llama-server-$version"
binary="$out/build/bin/llama-server"
if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

python="${PYTHON:-python3}"
if [[ -x "$(dirname "$0")/../.venv/bin/python" ]]; then
    python="$(dirname "$0")/../.venv/bin/python"
fi

mkdir -p "$out"
sdist="$out/llama_cpp_python-$version.tar.gz"
if [[ ! -f "$sdist" ]]; then
    # The source distribution only; its build requirements (needed by pip to read its
    # metadata) may come as wheels.
    "$python" -m pip download --no-binary llama-cpp-python --no-deps --dest "$out" \
        "llama-cpp-python==$version" >&2
fi
src="$out/src"
if [[ ! -d "$src/vendor/llama.cpp" ]]; then
    rm -rf "$src"
    mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=1
fi

# Native CPU flags (the reference should use every SIMD extension this machine has, as a
# user's own build would); nothing beyond the server: no tests, examples, curl or GPU backends.
cmake -S "$src/vendor/llama.cpp" -B "$out/build" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$out/build" --config Release --target llama-server -j "$jobs" >&2
[[ -x "$binary" ]] || { echo "build finished but $binary is missing" >&2; exit 1; }
echo "$binary"
