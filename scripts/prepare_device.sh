#!/usr/bin/env bash
# Run here, on the CPU machine, before a device call: fills the gitignored folders that the
# call carries (see scripts/gpu_bench.sh):
#   .whl/      cp312 manylinux wheels of what the device image lacks for the server and the
#              benchmark client (the versions installed in .venv where there is one)
#   .gpu_tok/  make_random_llama.py and SmolLM2's tokenizer files (tok/)
# Needs .venv (scripts/install.sh) for the versions and the tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TOOLS=${TOOLS:-../shared/tools}

# What the device image lacks (KINDS.md, "Python packages already there"): the server's
# pydantic/starlette/uvicorn stack, the openai SDK (for `lightgate chat`; newer ones need
# httpx2) and gguf, with every requirement of theirs that the image does not have either; and
# typing-extensions, which the image has but pydantic wants new (>= 4.16). Already there:
# anyio, httpx, httpcore, h11, idna, certifi, click, tqdm, numpy, pyyaml, requests,
# prometheus-client.
PACKAGES=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
          starlette uvicorn openai jiter distro sniffio httpx2 httpcore2 truststore gguf
          typing-extensions uvloop httptools
          llguidance  # constrained decoding (engine/grammar)
          pillow  # images in chat messages (openai_compat/images.py)
          py-spy  # a sampling profiler, for gpu_bench.sh's PYSPY
          jsonschema jsonschema-specifications referencing rpds-py attrs pytest-asyncio)  # the whole test tree collects

version_of() {  # the version installed in .venv, empty when none
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

rm -rf .whl
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$(version_of "$name")
    spec=$name${version:+==$version}
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$spec" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

# Every requirement of the wheels (on Python 3.12, Linux, extras left out) that is neither
# carried nor in the image stops here rather than on the device.
"$PY" - "${PACKAGES[@]}" <<'EOF'
import glob, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
carried = {canonicalize_name(n) for n in sys.argv[1:]}
image = {canonicalize_name(n) for n in (
    "anyio httpx httpcore h11 idna certifi click tqdm numpy pyyaml requests typing-extensions "
    "prometheus-client colorama pytest").split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
missing = set()
for path in sorted(glob.glob(".whl/*.whl")):
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                name = canonicalize_name(req.name)
                if name not in carried and name not in image:
                    missing.add(f"{req} (from {path.rsplit('/', 1)[-1]})")
if missing:
    sys.exit("requirements neither carried nor in the device image: " + "; ".join(sorted(missing)))
EOF

# The random-weight model writer and the tokenizer of the embedded default model.
rm -rf .gpu_tok
mkdir -p .gpu_tok/tok
cp "$TOOLS/make_random_llama.py" .gpu_tok/
src=$("$PY" -c "from engine.models.loader import resolve_model; print(resolve_model(None))")
cp "$src/tokenizer.json" "$src/tokenizer_config.json" .gpu_tok/tok/
[ -f "$src/chat_template.jinja" ] && cp "$src/chat_template.jinja" .gpu_tok/tok/

ls .whl
du -sh .whl .gpu_tok
