"""Invariants of every KL term × dtype: zero at equal policies, sign where promised, finite gradients
at extreme log-ratios, float32 math, and no recompilation across calls of one shape."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kljax

NAMES = kljax.kl_term_names()
DTYPES = [jnp.float32, jnp.bfloat16]


def _value_and_grad_estimators(name):
  base = name.split("+")[0]
  if "_value_" in base:
    value, grad = base.split("_value_")
    return value, grad.removesuffix("_grad")
  return base.split("_")[0], base.split("_")[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_invariants(name, dtype):
  term = kljax.kl_term(name)
  value_est, grad_est = _value_and_grad_estimators(name)
  rng = np.random.default_rng(0)
  logp = jnp.asarray(rng.normal(-3.0, 1.0, (4, 8)), dtype)

  # Zero at equal policies: every value, and every coefficient except the constant 1 of a k1 gradient.
  assert np.all(np.asarray(term.value(logp, logp)) == 0.0)
  expected_c = 1.0 if (term.placement == "loss" and grad_est == "k1") else 0.0
  np.testing.assert_allclose(term.coefficient(logp, logp), expected_c, atol=1e-6)

  # Non-negativity where promised (k2, k3), on arbitrary inputs.
  ref = jnp.asarray(rng.normal(-3.0, 2.0, (4, 8)), dtype)
  values = term.value(logp, ref)
  assert values.dtype == jnp.float32  # float32 math whatever the input dtype
  if value_est in ("k2", "k3"):
    assert np.all(np.asarray(values) >= 0.0)

  # Finite values and gradients at log-ratios of ±100, on- and off-policy.
  offsets = jnp.asarray(np.tile([-100.0, 100.0, -30.0, 0.0, 30.0, 5.0, -5.0, 100.0], (4, 1)), dtype)
  far_ref = (logp.astype(jnp.float32) + offsets).astype(dtype)
  far_old = (logp.astype(jnp.float32) - offsets[:, ::-1]).astype(dtype)
  for old in (None, far_old):
    loss = lambda lp: jnp.sum(term.surrogate(lp, far_ref, old))
    out, g = jax.value_and_grad(loss)(logp)
    assert np.isfinite(float(out)), (name, old is None)
    assert g.dtype == dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32))), (name, old is None)
  assert np.all(np.isfinite(np.asarray(term.value(logp, far_ref))))


@pytest.mark.parametrize("name", ["k2_as_loss", "k3_as_loss+clipped", "k1_in_reward_rtg"])
def test_no_recompilation_across_calls(name):
  term = kljax.kl_term(name)
  chex.clear_trace_counter()  # counts are per function body, shared by the parametrizations

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(lp, ref, old):
    return jax.grad(lambda x: jnp.sum(term.surrogate(x, ref, old)))(lp)

  rng = np.random.default_rng(1)
  for _ in range(4):
    lp, ref, old = (jnp.asarray(rng.normal(-2, 1, (3, 5)), jnp.float32) for _ in range(3))
    step(lp, ref, old).block_until_ready()  # a second trace raises AssertionError
