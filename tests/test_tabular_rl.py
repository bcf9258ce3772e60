"""The exact sequence study: target choice, sampled-gradient training and the gradient-noise ratio."""

import itertools

import jax
import numpy as np
import pytest

from kljax import exact, tabular_rl
from kljax.kl import kl_term


def _seq_probs_numpy(ref):
  """P_ref(y) by the chain rule in float64 NumPy, in lexicographic order."""
  vocab, length = len(ref[0]), len(ref)
  out = []
  for y in itertools.product(range(vocab), repeat=length):
    p = 1.0
    for t in range(length):
      logits = np.asarray(ref[t], np.float64)[tuple(y[:t])]
      e = np.exp(logits - logits.max())
      p *= e[y[t]] / e.sum()
    out.append(p)
  return np.array(out)


def test_rare_target_is_the_sequence_nearest_the_asked_probability():
  ref = exact.random_tabular(jax.random.PRNGKey(0), vocab=3, length=3, scale=1.5)
  probs = _seq_probs_numpy(ref)
  for want in (1e-3, 0.01, 0.1):
    assert tabular_rl.rare_target(ref, want) == np.argmin(np.abs(np.log(probs) - np.log(want)))


def test_sequence_rkl_term_reaches_the_closed_form_optimum():
  """k1 in reward with reward-to-go follows ∇ of the sequence RKL, so it ends near
  π*(y*) = q e^{1/β} / (q e^{1/β} + 1 − q) (π* ∝ π_ref e^{r/β}, hand derivation)."""
  ref = exact.random_tabular(jax.random.PRNGKey(2), vocab=2, length=3)
  target = tabular_rl.rare_target(ref, 0.05)
  q = _seq_probs_numpy(ref)[target]
  beta = 0.5
  star = q * np.exp(1 / beta) / (q * np.exp(1 / beta) + 1 - q)
  tr = tabular_rl.train(kl_term("k1_in_reward_rtg"), ref, target, beta=beta, num_steps=600,
                        seeds=3, learning_rate=0.02, snapshot_every=100)
  assert tr.curves["rkl"].shape == (3, 600)
  assert np.mean(tr.curves["target_prob"][:, -50:]) == pytest.approx(star, abs=0.05)
  assert tr.curves["rkl"][:, 0] == pytest.approx(0.0, abs=1e-6)  # starts at π_ref
  assert len(tr.snapshots) == 3 and tr.snapshots[0].shape == (6, 2)
  with pytest.raises(ValueError, match="multiple of snapshot_every"):
    tabular_rl.train(kl_term("k2_as_loss"), ref, target, beta=beta, num_steps=10, seeds=1,
                     snapshot_every=3)


def test_gradient_noise_shrinks_as_one_over_root_n():
  ref = exact.random_tabular(jax.random.PRNGKey(3), vocab=2, length=2)
  policy = exact.random_tabular(jax.random.PRNGKey(4), vocab=2, length=2)
  stacked = tuple(np.asarray(t)[None] for t in policy)
  term = kl_term("k2_as_loss")
  small = tabular_rl.kl_gradient_noise(term, stacked, ref, jax.random.PRNGKey(0), num_samples=16,
                                       num_trials=2000)[0]
  large = tabular_rl.kl_gradient_noise(term, stacked, ref, jax.random.PRNGKey(1), num_samples=64,
                                       num_trials=2000)[0]
  assert large / small == pytest.approx(0.5, rel=0.1)  # i.i.d. samples: std ∝ 1/√N
