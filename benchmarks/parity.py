"""Refactor parity: every metric of a few short GRPO runs, to compare before and after a change.

  python benchmarks/parity.py --json before.json          # on the old tree
  python benchmarks/parity.py --json after.json --compare before.json

The runs cover each KL kind (as loss, in the reward with both reward stages, the exact full-vocab
and top-k terms, none), on- and off-policy (epochs/minibatches, a stale bfloat16 sampler with TIS),
and a β controller. Each starts from one short SFT warm start, so gradients are real. Timing
metrics are left out; everything else must be equal to the last digit (`--compare` exits 1 naming
each difference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TIMING = ("time_", "tokens_per_second", "seconds")

RUNS = {
    "k2_as_loss": {"kl.term": "k2_as_loss"},
    "k3_as_loss_offpolicy": {"kl.term": "k3_as_loss", "loss.epochs": 2, "loss.minibatches": 2},
    "k3_ratio_offpolicy": {"kl.term": "k3_as_loss+ratio", "loss.minibatches": 2},
    "k1_in_reward_after_norm": {"kl.term": "k1_in_reward", "kl.reward_stage": "after_norm"},
    "k1_in_reward_before_norm": {"kl.term": "k1_in_reward", "kl.reward_stage": "before_norm"},
    "k2_in_reward_rtg_offpolicy": {"kl.term": "k2_in_reward_rtg", "loss.minibatches": 2},
    "k1_in_reward_current": {"kl.term": "k1_in_reward", "loss.minibatches": 2,
                             "kl.reward_at": "current"},
    "k1_in_reward_before_norm_offpolicy": {"kl.term": "k1_in_reward", "loss.epochs": 2,
                                           "kl.reward_stage": "before_norm"},
    "exact_rkl_as_loss": {"kl.term": "exact_rkl_as_loss"},
    "exact_rkl_rb_offpolicy": {"kl.term": "exact_rkl_rb", "loss.minibatches": 2},
    "top8_rkl_as_loss": {"kl.term": "top8_rkl_as_loss"},
    "none": {"kl.term": "none"},
    "stale_bf16_tis": {"kl.term": "k3_as_loss", "rollout.staleness": 1,
                       "rollout.dtype": "bfloat16", "rollout.correction": "tis_token"},
    "adaptive_dr_grpo": {"kl.term": "k2_as_loss", "kl.controller": "adaptive",
                         "advantage.estimator": "dr_grpo",
                         "loss.aggregation": "seq-mean-token-mean"},
}


def config_for(data_dir: str, changes: dict):
  from kljax.train import config as config_lib

  c = config_lib.grpo_tiny()
  c.data.data_dir = data_dir
  c.batch_size, c.rollout.group_size, c.rollout.max_new_tokens = 16, 4, 3
  c.num_steps, c.checkpoint_every, c.metrics.tensorboard = 4, 2, False
  c.mesh.devices = 1
  c.update_from_flattened_dict(changes)  # {"kl.term": …}
  return c


def measure(names) -> dict:
  from kljax import models
  from kljax.train import grpo
  from kljax.train.sft import train_sft

  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, "tfds")
    init = train_sft(preset="tiny", dataset="arithmetic/level1", data_dir=data_dir, steps=60,
                     progress=False)[0]
    init_dir = os.path.join(tmp, "init")
    models.export_hf(init, init_dir)
    for name in names:
      print(f"parity: {name}", file=sys.stderr, flush=True)
      rows = grpo.train(config_for(data_dir, RUNS[name]), os.path.join(tmp, name),
                        init_model=models.from_hf(init_dir), progress=False)
      out[name] = [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]
  return out


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def compare(now: dict, before: dict) -> list[str]:
  bad = []
  for name, rows in before.items():
    if name not in now:
      continue
    for old, new in zip(rows, now[name], strict=True):
      for key in sorted(set(old) | set(new)):
        if not _same(old.get(key), new.get(key)):
          bad.append(f"{name} step {old['step']} {key}: {old.get(key)!r} -> {new.get(key)!r}")
  return bad


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", help="write the metrics here")
  p.add_argument("--compare", help="a JSON of an earlier run: exit 1 on any difference")
  p.add_argument("--run", action="append", choices=tuple(RUNS), help="only these runs")
  args = p.parse_args()
  now = measure(args.run or tuple(RUNS))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(now, f, indent=1)
  print(f"{len(now)} runs, {sum(len(r) for r in now.values())} steps")
  if args.compare:
    with open(args.compare) as f:
      bad = compare(now, json.load(f))
    for line in bad:
      print(line)
    print(f"parity: {'DIFFERENT' if bad else 'identical'} ({len(bad)} differences)")
    return 1 if bad else 0
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
