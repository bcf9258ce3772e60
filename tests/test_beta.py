"""β controllers against hand-written recurrences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kljax


def test_constant_and_schedule():
  c = kljax.constant_beta(0.05)
  state = c.init()
  for _ in range(3):
    state = c.update(state, 1.0)
  assert float(state.beta) == pytest.approx(0.05)
  s = kljax.scheduled_beta(optax.linear_schedule(0.0, 1.0, transition_steps=10))
  state = s.init()
  assert float(state.beta) == 0.0
  state = s.update(state, None, n_steps=4)
  assert float(state.beta) == pytest.approx(0.4)
  assert int(state.count) == 4


def test_adaptive_matches_ziegler_recurrence():
  kls = [0.02, 0.5, 0.11, 0.0, 0.09, 0.3]
  ctrl = kljax.adaptive_beta(0.1, target_kl=0.1, horizon=50.0)
  update = jax.jit(lambda s, kl: ctrl.update(s, kl, n_steps=8))
  state, beta = ctrl.init(), 0.1
  for kl in kls:
    state = update(state, jnp.float32(kl))
    beta *= 1 + np.clip(kl / 0.1 - 1, -0.2, 0.2) * 8 / 50.0
    assert float(state.beta) == pytest.approx(beta, rel=1e-6)
  assert int(state.count) == 8 * len(kls)


def test_beta_controller_accepts_every_spec():
  assert float(kljax.beta_controller(0.2).init().beta) == pytest.approx(0.2)
  sched = optax.exponential_decay(1.0, 10, 0.5)
  assert float(kljax.beta_controller(sched).update(kljax.beta_controller(sched).init(), None,
                                                   n_steps=10).beta) == pytest.approx(0.5)
  ctrl = kljax.adaptive_beta(0.1, target_kl=1.0, horizon=10)
  assert kljax.beta_controller(ctrl) is ctrl


def test_controller_state_scans():
  ctrl = kljax.adaptive_beta(1.0, target_kl=0.1, horizon=10)
  final, betas = jax.lax.scan(lambda s, kl: (ctrl.update(s, kl), s.beta), ctrl.init(),
                              jnp.full((5,), 1.0))
  np.testing.assert_allclose(betas, 1.02 ** np.arange(5), rtol=1e-6)  # error clipped at +0.2
  assert float(final.beta) == pytest.approx(1.02**5, rel=1e-6)


def test_controller_names_map_to_their_recurrences():
  from kljax import beta as beta_lib

  # Hand rules: constant β; 0 → β linearly over warmup_steps updates; Ziegler's β·(1 + e·n/H).
  const = beta_lib.controller("constant", beta=0.2)
  assert float(const.update(const.init(), 9.0).beta) == pytest.approx(0.2)
  warm = beta_lib.controller("linear_warmup", beta=0.2, warmup_steps=4)
  state = warm.init()
  assert float(state.beta) == 0.0
  assert float(warm.update(state, None, n_steps=1).beta) == pytest.approx(0.05)
  ada = beta_lib.controller("adaptive", beta=0.1, target_kl=0.1, horizon=50.0)
  error = np.clip(0.3 / 0.1 - 1.0, -0.2, 0.2)
  assert float(ada.update(ada.init(), 0.3, n_steps=5).beta) == pytest.approx(0.1 * (1 + error * 5 / 50))
  with pytest.raises(ValueError, match="controller must be one of 'constant', 'linear_warmup'"):
    beta_lib.controller("pid", beta=0.1)
