#!/usr/bin/env bash
# GPU benchmark of kljax at real shapes (qwen2.5-0.5b and qwen2.5-1.5b, bfloat16), ≤ 6 minutes on
# one H100: sampler tokens/s, GRPO-update MFU against the bf16 matmul peak measured in the same
# run, one GRPO iteration. Writes benchmarks/results/<date>_<device>.json.
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
exec python benchmarks/gpu.py "$@"
