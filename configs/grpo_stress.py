"""GRPO in a stressing regime for claim 3 (k2 vs k3 as loss): the reproduction's stress settings
(`stress_config` of configs/reproduce.py, run as it is in the quick preset and for 300 steps in
the full one) — arithmetic prompts, a 30-step warm start, lr 2e-3, β 0.5, 80 steps, and a reward
for one completion the reference almost never writes.

  python -m experiments.grpo --config configs/grpo_stress.py --workdir /tmp/kljax_stress \
      --config.kl.term=k3_as_loss

The reward (`experiments.rare_target:target_match`) is the fraction of the characters of "7777" a
completion matches position by position: partial answers score, so the signal is dense, while the
whole target is far outside what the warm-started reference produces (the reproduction's report
prints its measured log π_ref). A policy that learns it sits at δ = π_ref/π → 0, where k3's
coefficient 1 − δ saturates at 1 and the reverse-KL one, log(π/π_ref), keeps growing: the regime in
which theory expects k3 as a loss to regularize less than k2.

An earlier search used the correct arithmetic answer as the reward from the same weak warm start
(experiments/results/stress_search.md): there the policy barely learned in 80 steps and no
sampled completion held log π/π_ref ≥ 5 nats, so that setting could not test the claim.
"""

import ml_collections

from kljax.train.config import grpo_tiny


def get_config() -> ml_collections.ConfigDict:
  c = grpo_tiny()
  c.num_steps = 80  # the quick reproduction; the full one runs 300
  c.checkpoint_every = 20
  c.sft.steps = 30  # a weak warm start (the target's log π_ref is lower still after 200 steps)
  c.reward.fns = ("experiments.rare_target:target_match",)
  c.optim.learning_rate = 2e-3
  c.kl.term = "k2_as_loss"
  c.kl.beta = 0.5
  c.mesh.devices = 1
  c.metrics.tensorboard = False
  return c
