"""Where kljax's decode time goes at qwen2.5-0.5b's shape: stacked layers (scan) vs unrolled layers.

  flock /tmp/kljax-heavy.lock python benchmarks/sampler_real.py

Samples 8 prompts × 32 new tokens (16-token prompts, temperature 1, float32, one CPU device, as in
benchmarks/vs_trl_real.py) with the preset's stacked layers run by `jax.lax.scan`, and with the same
weights unrolled (`scan_layers=False`: each layer's weights sliced once before the decode loop).
A decode step at batch 8 reads every weight once, so it is memory-bound: the implied weight
bandwidth (float32 parameter bytes × steps / seconds) shows how far each is from streaming them.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 16, 32


def main() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from kljax import models
  from kljax.sampling import sample

  cfg = models.preset("qwen2.5-0.5b", dtype="float32", param_dtype="float32")
  scanned = models.create(cfg, seed=0)
  unrolled = models.create(cfg.replace(scan_layers=False), seed=0)
  nnx.update(unrolled, nnx.state(scanned))  # the same weights
  prompt = jnp.asarray(np.random.default_rng(1).integers(4, cfg.vocab_size,
                                                         (PROMPTS, PROMPT_LEN)), jnp.int32)
  mask = jnp.ones_like(prompt, bool)
  weight_bytes = 4 * cfg.num_params()
  print(f"qwen2.5-0.5b float32 ({weight_bytes / 2**30:.2f} GiB of weights), {PROMPTS} × "
        f"{NEW_TOKENS} new tokens after {PROMPT_LEN}-token prompts, backend {jax.default_backend()}")
  for name, model in (("scan over stacked layers", scanned), ("unrolled layers", unrolled)):
    run = lambda m=model: sample(m, prompt, mask, jax.random.PRNGKey(0), max_new_tokens=NEW_TOKENS,
                                 eos_id=cfg.vocab_size - 1).tokens_bt.block_until_ready()
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    times = []
    for _ in range(2):
      t = time.perf_counter()
      run()
      times.append(time.perf_counter() - t)
    s = statistics.median(times)
    print(f"{name:26s} {s:6.2f} s  {PROMPTS * NEW_TOKENS / s:6.1f} tokens/s  implied weight "
          f"bandwidth {weight_bytes * NEW_TOKENS / s / 1e9:5.1f} GB/s  (first call, with "
          f"compilation, {first:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
