"""GPU benchmark at real shapes: sampler tokens/s, GRPO-update MFU and one GRPO iteration.

  bash benchmarks/gpu.sh              # on one GPU: qwen2.5-0.5b and qwen2.5-1.5b shapes, bfloat16
  bash benchmarks/gpu.sh --quick      # any machine (CI runs it on CPU): tiny shapes, seconds

Every model is randomly initialised at the preset's real shape (vocabulary 151,936), weights and
compute in bfloat16. Measured in one run, against the card's bf16 matmul peak measured in the same
run (the best of several large `jnp.dot`s with float32 accumulation):
  sampler   tokens/s of `kljax.sampling.sample` (KV cache, temperature 1, no EOS), batch × new tokens
  update    the real on-policy GRPO update (`kljax.train.grpo.update`: policy forward and backward,
            reference forward, PPO-clip + k2-as-loss, AdamW) on random completions; MFU counts
            4 forward-equivalents per token (policy 3, reference 1), 2 FLOPs per matmul parameter
            and 4·L·T·H·Hd of attention per token forward
  iteration one rollout of the same batch plus one update (no reward model: random advantages)
Results (not in --quick) are written to benchmarks/results/<date>_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import models, sharding
from kljax.sampling import sample
from kljax.train import grpo
from kljax.train.config import grpo_tiny
from kljax.train.options import Options
from sampler import _median_time  # benchmarks/sampler.py: this script's directory is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def matmul_peak(n: int, reps: int) -> float:
  """Best bf16 FLOP/s of an n×n×n `jnp.dot` (float32 accumulation)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def forward_flops_per_token(cfg, length: int) -> float:
  n = models.count_params(models.abstract(cfg))
  matmul = n - cfg.vocab_size * cfg.d_model - (2 * cfg.num_layers + 1) * cfg.d_model
  if cfg.tie_embeddings:  # the tied matrix is also the output projection
    matmul += cfg.vocab_size * cfg.d_model
  return 2 * matmul + 4 * cfg.num_layers * length * cfg.num_heads * cfg.head_dim


def bench_preset(preset: str, *, prompts: int, group: int, prompt_len: int, new_tokens: int,
                 reps: int, peak: float) -> dict:
  cfg = models.preset(preset, dtype="bfloat16", param_dtype="bfloat16")
  model = models.create(cfg, seed=0)
  mesh = sharding.make_mesh(data=-1, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = prompts * group
  prompt = jnp.asarray(rng.integers(3, cfg.vocab_size - 1, (prompts, prompt_len)), jnp.int32)
  mask = jnp.ones((prompts, prompt_len), bool)
  eos = cfg.vocab_size - 1
  rollout = lambda: sample(model, prompt, mask, jax.random.PRNGKey(1), max_new_tokens=new_tokens,  # noqa: E731
                           eos_id=eos, temperature=1.0, samples_per_prompt=group)
  t_sample = _median_time(rollout, reps)
  out = rollout()

  c = grpo_tiny()
  c.batch_size, c.data.max_prompt_len, c.rollout.max_new_tokens = batch, prompt_len, new_tokens
  c.metrics.exact_kl = False
  graphdef, params = nnx.split(model)
  setup = grpo.bare_setup(Options.of(c), graphdef, mesh)
  optimizer = setup.optimizer
  # The update donates the policy and its optimizer state: the policy gets arrays of its own, the
  # model's (still sampled from above) serve as the reference.
  state = {"params": sharding.copy_tree(params), "opt": optimizer.init(params)}
  completion = np.asarray(out.completion_mask_bn)
  batch_in = {"tokens": out.tokens_bt,
              "attn_mask": jnp.concatenate([jnp.repeat(mask, group, 0), completion], axis=1),
              "mask": jnp.asarray(completion),
              "advantages": jnp.asarray(rng.normal(size=completion.shape), jnp.float32)}
  update = grpo.compile_fns(setup)["update"]  # the trainer's jitted update
  def step():
    state["params"], state["opt"], aux = update(state["params"], state["opt"], jnp.float32(0.05),
                                                batch_in, params)
    return aux

  t_update = _median_time(step, reps)
  t_iteration = _median_time(lambda: (rollout(), step()), max(1, reps // 2))

  length = prompt_len + new_tokens
  flops = 4 * forward_flops_per_token(cfg, length) * batch * length
  generated = batch * new_tokens
  return {
      "preset": preset, "params": models.count_params(model), "prompts": prompts, "group": group,
      "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": "bfloat16",
      "sampler_tokens_per_s": generated / t_sample, "sampler_s": t_sample,
      "update_s": t_update, "update_tflops": flops / t_update / 1e12, "update_mfu": flops / t_update / peak,
      "iteration_s": t_iteration,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-1.5b")
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=256)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  args = p.parse_args()
  if args.quick:
    args.presets, args.prompts, args.group, args.prompt_len, args.new_tokens, args.reps = (
        "tiny", 2, 2, 8, 8, 1)
  device = jax.devices()[0]
  peak = matmul_peak(256 if args.quick else 8192, 3 if args.quick else 10)
  print(f"device {device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}; "
        f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s (measured)", flush=True)
  rows = []
  for preset in args.presets.split(","):
    r = bench_preset(preset, prompts=args.prompts, group=args.group, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, reps=args.reps, peak=peak)
    rows.append(r)
    print(f"{preset}: {r['params'] / 1e9:.2f}B params, {r['prompts']}×{r['group']} completions of "
          f"{r['prompt_len']}+{r['new_tokens']} tokens | sampler {r['sampler_tokens_per_s']:.0f} "
          f"tokens/s | update {r['update_s']:.3f} s, {r['update_tflops']:.1f} TFLOP/s, MFU "
          f"{r['update_mfu']:.1%} | iteration {r['iteration_s']:.3f} s", flush=True)
  if not args.quick:
    os.makedirs(args.out, exist_ok=True)
    name = f"{datetime.date.today()}_{device.device_kind.replace(' ', '_')}"
    result = {"device": device.device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "bf16_peak_tflops": peak / 1e12, "rows": rows}
    with open(os.path.join(args.out, name + ".json"), "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(args.out, name + '.json')}")


if __name__ == "__main__":
  main()
