"""GRPO in a stressing regime for claim 3 (k2 vs k3 as loss): the reproduction's stress settings
(`stress_config` of configs/reproduce.py, run as it is in the quick preset and for 300 steps in
the full one) — arithmetic level 1 from a 30-step warm start, lr 2e-3, β 0.5, 80 steps.

  python -m experiments.grpo --config configs/grpo_stress.py --workdir /tmp/kljax_stress \
      --config.kl.term=k3_as_loss

The regime it aims at: correct answers the reference rarely produces. Under this warm start the
correct answer has mean π_ref 0.017 and π_ref ≤ e^-5 for 31 % of test prompts
(experiments/stress_refprob.py), so a policy that learned them would sit at completion log π/π_ref
≥ 5 nats, where k3's coefficient 1 − δ saturates and the reverse-KL one keeps growing.
Measured (experiments/results/stress_search.md): it does NOT get there — the policy barely learns
(reward 0.020 → 0.027 over 80 steps) and the largest completion log π/π_ref of any sampled
completion is 1.9 nats for both k2_as_loss and k3_as_loss (final exact RKL 0.008 for both).
Neither lr 5e-3, arithmetic level 2 (100-step warm start) nor β 0.1 sustained ≥ 5 nats at 80 steps.
"""

import ml_collections

from kljax.train.config import grpo_tiny


def get_config() -> ml_collections.ConfigDict:
  c = grpo_tiny()
  c.num_steps = 80  # the quick reproduction; the full one runs 300
  c.checkpoint_every = 20
  c.sft.steps = 30  # a weak warm start: correct answers are rare
  c.optim.learning_rate = 2e-3
  c.kl.term = "k2_as_loss"
  c.kl.beta = 0.5
  c.mesh.devices = 1
  c.metrics.tensorboard = False
  return c
