"""Bandit: maximize E_π[r] − β·KL(π‖π_ref) with every KL term, exact and sampled gradients.

Run (about 20 s on 2 CPU cores):

  python -m experiments.bandit --config configs/bandit.py --workdir /tmp/kljax_bandit

Overrides use dotted flags, e.g. an off-policy run with 4 inner steps per sample batch:

  python -m experiments.bandit --config configs/bandit.py --workdir /tmp/kljax_bandit_off \
      --config.inner_steps=4 --config.terms=k2_as_loss,k2_as_loss+detached_ratio,k2_as_loss+clipped

`--config.terms=all` runs every name `kljax.kl_term_names()` lists (reward-to-go variants are
identical to token credit for a one-step policy and are left out).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # The problem: a K-armed bandit with random rewards and a random reference policy.
  config.problem = ml_collections.ConfigDict()
  config.problem.num_arms = 10  # K, the number of arms (actions)
  config.problem.beta = 0.3  # KL coefficient β of the objective
  config.problem.reward_scale = 1.0  # rewards are standard normal × this
  config.problem.ref_temperature = 1.0  # π_ref = softmax(standard normal logits / this)
  config.problem.seed = 0  # draws the rewards and the reference

  # The KL terms and how their gradients are estimated.
  config.terms = (  # comma-separated kljax.kl_term_names(), or "all"
      "k1_in_reward,k1_as_loss,k2_as_loss,k3_as_loss,k2_in_reward,k3_in_reward,k3_value_k2_grad,"
      "k2_as_loss+detached_ratio,k2_as_loss+clipped,k2_as_loss+ratio,k3_as_loss+ratio"
  )
  config.modes = "exact,sampled"  # exact expected gradients, sampled ones, or both
  config.num_samples = 64  # actions per sampled gradient
  config.inner_steps = 1  # > 1: reuse each sample batch for that many steps (off-policy)

  # Optimization: Adam on the logits, cosine-decayed learning rate.
  config.num_steps = 3000  # Adam steps on the logits
  config.learning_rate = 0.1  # peak learning rate
  config.final_lr_fraction = 0.01  # the cosine ends at learning_rate × this
  config.seed = 0  # the sampled actions (the logits start at log π_ref)
  return config
