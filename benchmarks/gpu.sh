#!/usr/bin/env bash
# GPU benchmark of kljax at real shapes (qwen2.5-0.5b and qwen2.5-1.5b, bfloat16), ≤ 8 minutes on
# one H100: sampler tokens/s, GRPO-update MFU against the bf16 matmul peak measured in the same
# run, one GRPO iteration. Writes benchmarks/results/<date>_<device>.json. Then kljax's side of
# benchmarks/vs_peers.py at its shape (qwen2.5-0.5b, float32, 2 prompts × G=4 × 32 tokens):
# benchmarks/results/<date>_<device>_vs_peers_kljax.json. Then, where vllm is installed, the vllm
# rollout engine against the jax engine and HF generate at the qwen2.5-0.5b and 1.5b shapes
# (benchmarks/vllm_engine.py): benchmarks/results/<date>_<device>_vllm_engine_<preset>.json.
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --quick    # anywhere (CI runs it on CPU so it stays ready)
#
# The GPU machine needs no network. Besides JAX with CUDA, Flax, Optax, Orbax and chex it needs
# kljax's other runtime packages, installable offline from wheels made elsewhere with
#   pip download --only-binary=:all: -d wheels ml-collections absl-py tqdm safetensors tokenizers \
#     tensorflow-datasets array-record tensorboardX etils importlib-resources
# and then, there: pip install --no-index --find-links wheels <the same names>.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}"
python -c 'import jax; print("JAX", jax.__version__, "devices", jax.devices())'
python benchmarks/gpu.py "$@"
if [ "${1:-}" = "--quick" ]; then
  python benchmarks/peer_kljax.py --preset small --layers 1 --iters 1 --new_tokens 4 >/dev/null
  echo "vs_peers kljax side: ran (quick)"
else
  device=$(python -c 'import jax; print(jax.devices()[0].device_kind.replace(" ", "_"))')
  python benchmarks/peer_kljax.py --iters 3 \
    | tail -n 1 > "benchmarks/results/$(date +%F)_${device}_vs_peers_kljax.json"
  cat "benchmarks/results/$(date +%F)_${device}_vs_peers_kljax.json"
  # The vllm rollout engine against the jax engine and HF generate (needs `pip install vllm`).
  if python -c 'import vllm' 2>/dev/null; then
    for preset in qwen2.5-0.5b qwen2.5-1.5b; do
      python benchmarks/vllm_engine.py --preset "$preset" --sync --prompts 8 --group 8 \
        --new_tokens 256 --skip_hf --json "benchmarks/results/$(date +%F)_${device}_vllm_engine_${preset}.json"
    done
  else
    echo "vllm engine: not benchmarked (vllm is not installed)"
  fi
fi
