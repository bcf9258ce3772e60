"""Seconds per GRPO iteration and generated tokens/s for the tiny config, split by phase.

  python benchmarks/grpo_step.py            # configs/grpo_tiny.py settings, 20 timed steps
  python benchmarks/grpo_step.py --quick

Runs the real trainer step (rollout with the KV-cache sampler, rewards, advantages, log-probs of
policy and reference, the update) after compiling, and reports medians of each phase.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/kljax/tfds"))
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()

  from kljax.train import grpo

  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", "grpo_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = args.data_dir
  config.metrics.tensorboard = False
  warmup = 2
  if args.quick:
    args.steps, config.batch_size, config.rollout.group_size = 2, 16, 4
  config.num_steps = warmup + args.steps
  config.checkpoint_every = 10**6
  with tempfile.TemporaryDirectory() as workdir:
    history = grpo.train(config, workdir, progress=False)
  timed = history[warmup:]
  med = lambda k: statistics.median(h[k] for h in timed)
  total = med("time_rollout") + med("time_logprobs") + med("time_update")
  generated = statistics.median(h["length_mean"] * config.batch_size for h in timed)
  print(f"grpo_tiny: {config.batch_size} completions ({config.batch_size // config.rollout.group_size}"
        f" prompts × {config.rollout.group_size}), ≤{config.rollout.max_new_tokens} new tokens, "
        f"medians over {len(timed)} steps after {warmup} warm-up steps")
  print(f"seconds per iteration {total:.4f}: rollout {med('time_rollout'):.4f}, log-probs "
        f"{med('time_logprobs'):.4f}, update {med('time_update'):.4f}")
  print(f"generated tokens/s {generated / med('time_rollout'):.0f} (rollout only), "
        f"{generated / total:.0f} (whole iteration)")


if __name__ == "__main__":
  main()
