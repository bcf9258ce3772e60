"""GRPO in a stressing regime for claim 3 (k2 vs k3 as loss): the reproduction's current stress
settings (kljax/reproduce.py, `grpo_config(..., stress=True)` of the quick preset).

  python -m experiments.grpo --config configs/grpo_stress.py --workdir /tmp/kljax_stress \
      --config.kl.term=k3_as_loss
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
