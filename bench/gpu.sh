#!/usr/bin/env bash
# apo vs TRL GRPOTrainer on a lent GPU: stage-2 seconds per step and peak GPU memory on a randomly
# initialised Qwen2.5-1.5B-shaped model (nothing can be downloaded there), vLLM where it imports.
# Writes bench/peers.py's JSON (key `gpu`) to $OUT/peers-gpu.json (or bench/results/ without $OUT).
#
#   bench/gpu.sh --fetch-wheels   # HERE, once: wheels the GPU image lacks (TRL, datasets, pydantic, ...) into .whl/
#   bench/gpu.sh                  # THERE (device tool, carry [".whl"]): the 1.5B measurement
#   bench/gpu.sh --tiny           # anywhere, CPU too: the same code on a tiny random model
#
# The GPU image has torch, transformers, accelerate, numpy, pyyaml, psutil, pandas and pyarrow, but
# no vLLM, TRL or pydantic. The small wheels travel in .whl/ (64 MiB limit of the working tree);
# vLLM's CUDA wheel is far larger than that, so without it both methods generate with transformers
# and the JSON says so (`engine`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.19.0 \
        pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    du -sh .whl
    exit 0
fi

size=1.5b
if [[ "${1:-}" == "--tiny" ]]; then size=tiny; fi

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    for candidate in bench/.venv-peers/bin/python .venv/bin/python python3; do
        if [[ -x "$candidate" ]] || command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
    done
fi
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if compgen -G ".whl/*.whl" >/dev/null && [[ "$pyver" == 3.12 ]]; then  # carried wheels (built for the GPU image's 3.12), offline
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/apo-bench-site .whl/*.whl
    export PYTHONPATH="/tmp/apo-bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

methods=apo
if "$py" -c "import trl, datasets" >/dev/null 2>&1; then methods=apo,trl_grpo; else echo "gpu.sh: trl not importable with $py: apo only"; fi
out_dir="${OUT:-bench/results}"
name=peers-gpu.json
if [[ "$size" == tiny ]]; then name=peers-gpu-tiny.json; fi
"$py" -c "import torch; print('gpu.sh: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$py" bench/peers.py --modes gpu --gpu-size "$size" --methods "$methods" \
    --threads "${THREADS:-${OMP_NUM_THREADS:-$(nproc)}}" --out "$out_dir/$name"
