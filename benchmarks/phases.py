"""Where a GRPO iteration's time goes at a real shape: wall, user and system CPU seconds and minor
page faults of the rollout and of the update, per iteration of the trainer's own `train_step`.

  flock /tmp/kljax-heavy.lock python benchmarks/phases.py [--layers L] [--rollout_dtype bfloat16] \
      [--out FILE]

Same shape and settings as `benchmarks/vs_peers.py` (qwen2.5-0.5b, float32, one CPU device,
2 prompts × G=4 × 32 new tokens, k3 as a loss at β = 0.04). Iteration 0 compiles and is shown
apart. On CPU a fresh buffer costs a page fault per 4 KiB page (the kernel zeroes it): system
seconds and minor faults show what allocation costs next to the arithmetic (user seconds). The
rollout's `sampler_logprob_gap` (mean |log μ − log π_old| per token) shows what a bfloat16 sampler
changes.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _usage():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime, r.ru_minflt


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="qwen2.5-0.5b")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
  p.add_argument("--iters", type=int, default=4, help="iterations, the first compiling")
  p.add_argument("--rollout_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/kljax/tfds"))
  p.add_argument("--out", default="")
  p.add_argument("--quick", action="store_true", help="one small layer: checks the script runs")
  a = p.parse_args(argv)
  if a.quick:
    a.preset, a.layers, a.iters = "small", 1, 2

  import jax

  from kljax import models
  from kljax.train import grpo
  from kljax.train.config import grpo_tiny

  cfg = models.preset(a.preset, dtype="float32", param_dtype="float32")
  cfg = cfg.replace(num_layers=a.layers) if a.layers else cfg
  c = grpo_tiny()
  c.data.data_dir, c.data.max_prompt_len = a.data_dir, 16
  c.batch_size, c.rollout.group_size, c.rollout.max_new_tokens = 8, 4, 32
  c.rollout.dtype, c.kl.term, c.kl.beta = a.rollout_dtype, "k3_as_loss", 0.04
  c.num_steps, c.metrics.exact_kl, c.metrics.tensorboard, c.mesh.devices = 10**6, False, False, 1
  setup, state = grpo.build(c, init_model=models.create(cfg, seed=0))
  fns = grpo.compile_fns(setup)
  rows: list[tuple] = []

  def timed(name, fn):
    def wrapped(*args, **kwargs):
      t, (u, s, f) = time.perf_counter(), _usage()
      out = fn(*args, **kwargs)
      u2, s2, f2 = _usage()
      rows.append((name, time.perf_counter() - t, u2 - u, s2 - s, f2 - f))
      return out
    return wrapped

  grpo.rollout = timed("rollout", grpo.rollout)
  grpo.update_epochs = timed("update", grpo.update_epochs)
  lines = [f"benchmarks/phases.py: {a.preset} with {cfg.num_layers} layers, float32 training, "
           f"rollout.dtype {a.rollout_dtype}, one CPU device ({os.cpu_count()} cores), "
           "2 prompts × G=4 × 32 new tokens",
           f"{'iter':>4} {'phase':8s} {'wall s':>7} {'user s':>7} {'sys s':>6} {'minor faults':>13} "
           f"{'sampler gap':>12}"]
  with jax.set_mesh(setup.mesh):
    for i in range(a.iters):
      rows.clear()
      state, m = grpo.train_step(setup, state, fns)
      for name, wall, user, system, faults in rows:
        lines.append(f"{i:4d} {name:8s} {wall:7.2f} {user:7.2f} {system:6.2f} {faults:13,d} "
                     + (f"{m['sampler_logprob_gap']:12.2e}" if name == "rollout" else ""))
  lines.append("(iteration 0 compiles)")
  report = "\n".join(lines)
  print(report)
  if a.out:
    with open(a.out, "w") as f:
      f.write(report + "\n")


if __name__ == "__main__":
  main()
