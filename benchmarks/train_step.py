"""Forward+backward of a ~20M-parameter preset: achieved FLOP/s vs this machine's matmul peak.

  python benchmarks/train_step.py           # preset 20m, float32, batch 8 × 256 tokens
  python benchmarks/train_step.py --quick

The step is `value_and_grad` of the next-token cross-entropy. FLOPs are counted analytically:
per token, forward = 2·(matmul parameters: N minus the embedding lookup and the norm scales) +
4·L·T·H·Hd (QKᵀ and PV over the full T×T scores, as computed); backward = 2 × forward. XLA's own
count (`cost_analysis`) is printed beside it as a cross-check (it is only comparable with unrolled
layers: a scanned loop body is counted once). The peak is the best of several large float32
`jnp.dot`s measured in the same run. Target ≥ 40%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kljax import models


def matmul_peak(n: int, reps: int) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = min(_time(lambda: f(a, a)) for _ in range(reps))
  return 2 * n**3 / best


def _time(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="20m")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.preset, args.batch, args.length, args.reps = "tiny", 2, 16, 2

  cfg = models.preset(args.preset)
  model = models.create(cfg, seed=0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.length), 0, cfg.vocab_size)

  def loss(m, t):
    logp = jax.nn.log_softmax(m(t)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, t: jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s), t))(s))
  compiled = step.lower(state, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"])
  n = models.count_params(model)
  ntok = args.batch * args.length
  matmul_params = n - cfg.vocab_size * cfg.d_model - (2 * cfg.num_layers + 1) * cfg.d_model
  if cfg.tie_embeddings:  # the tied matrix is also the output projection
    matmul_params += cfg.vocab_size * cfg.d_model
  forward = 2 * matmul_params + 4 * cfg.num_layers * args.length * cfg.num_heads * cfg.head_dim
  flops = 3 * forward * ntok

  jax.block_until_ready(step(state, tokens))
  seconds = statistics.median(_time(lambda: step(state, tokens)) for _ in range(args.reps))
  peak = matmul_peak(2048 if not args.quick else 256, 5)
  achieved = flops / seconds
  print(f"preset {args.preset}: {n:,} params, batch {args.batch}×{args.length}, {cfg.dtype}, "
        f"scan_layers={cfg.scan_layers}, backend {jax.default_backend()}")
  print(f"step {seconds * 1e3:.1f} ms; FLOPs per step: analytic {flops / 1e9:.2f} G "
        f"(XLA cost analysis: {xla_flops / 1e9:.2f} G)")
  print(f"achieved {achieved / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"fraction {achieved / peak:.1%} (target ≥ 40%)")


if __name__ == "__main__":
  main()
