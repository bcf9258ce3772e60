"""Estimators against NumPy formulas, exact KL against NumPy, clamps, and Schulman's Gaussian table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kljax


def _np_logsoftmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_k_values_match_numpy(rng):
  logp = rng.normal(-2.0, 1.0, (4, 7)).astype(np.float32)
  ref = rng.normal(-2.0, 1.0, (4, 7)).astype(np.float32)
  log_delta = ref.astype(np.float64) - logp
  np.testing.assert_allclose(kljax.k1(logp, ref), -log_delta, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(kljax.k2(logp, ref), 0.5 * log_delta**2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      kljax.k3(logp, ref), np.exp(log_delta) - 1 - log_delta, rtol=1e-5, atol=1e-6
  )


def test_k3_precise_near_equal_policies():
  # δ − 1 − log δ ≈ (log δ)²/2 for small log δ: a naive exp(x) − 1 − x loses it to cancellation.
  logp = jnp.full((3,), -1.0, jnp.float32)
  ref = logp + jnp.array([1e-4, -1e-4, 3e-4], jnp.float32)
  x = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
  expected = x**2 / 2 + x**3 / 6
  np.testing.assert_allclose(kljax.k3(logp, ref), expected, rtol=1e-2)


def test_bfloat16_in_float32_out():
  logp = jnp.array([-1.0, -2.0], jnp.bfloat16)
  ref = jnp.array([-1.5, -1.0], jnp.bfloat16)
  for fn in (kljax.k1, kljax.k2, kljax.k3):
    assert fn(logp, ref).dtype == jnp.float32
  assert kljax.exact_kl(jnp.zeros((2, 5), jnp.bfloat16), jnp.ones((2, 5), jnp.bfloat16)).dtype == (
      jnp.float32
  )


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_exact_kl_matches_numpy(rng, direction):
  logits = rng.normal(size=(3, 4, 11)) * 2
  ref_logits = rng.normal(size=(3, 4, 11)) * 2
  lp, lq = _np_logsoftmax(logits), _np_logsoftmax(ref_logits)
  if direction == "forward":
    lp, lq = lq, lp
  expected = (np.exp(lp) * (lp - lq)).sum(-1)
  got = kljax.exact_kl(logits.astype(np.float32), ref_logits.astype(np.float32), direction=direction)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_exact_kl_mask_and_masked_vocabulary():
  logits = jnp.array([[0.0, 1.0, -jnp.inf], [2.0, 0.0, 1.0]])
  ref_logits = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
  kl = kljax.exact_kl(logits, ref_logits, mask=jnp.array([True, False]))
  p = np.exp(_np_logsoftmax([0.0, 1.0]))
  q = np.exp(_np_logsoftmax([0.5, 0.5, 0.0]))[:2]
  np.testing.assert_allclose(kl, [np.sum(p * (np.log(p) - np.log(q))), 0.0], rtol=1e-5)
  grad = jax.grad(lambda x: kljax.exact_kl(x, ref_logits).sum())(logits)
  assert np.all(np.isfinite(grad)), grad


def test_clamp_counts_and_keeps_gradients_finite_and_nonzero():
  logp = jnp.array([-1.0, -150.0, -1.0, -1.0])
  ref = jnp.array([-1.0, -1.0, -150.0, -5.0])  # log δ = 0, +149 (overflows), −149, −4
  # Only the side where exp() could overflow is clamped, so only log δ = +149 is counted.
  assert int(kljax.count_clamped(logp, ref, clamp=20.0)) == 1
  assert int(kljax.count_clamped(logp, ref, clamp=20.0, mask=jnp.array([1, 0, 1, 1]))) == 0
  g = jax.grad(lambda lp: kljax.k3(lp, ref, clamp=20.0).sum())(logp)
  # ∂k3/∂logp = 1 − δ: exact at log δ = −149 (→ 1, where a two-sided clamp gave a silent 0), and
  # beyond the clamp the tangent line's slope 1 − e^20 (finite, non-zero, the right sign).
  np.testing.assert_allclose(g, [0.0, 1 - np.exp(20.0), 1.0, 1 - np.exp(-4.0)], rtol=1e-6)
  values = np.asarray(kljax.k3(logp, ref, clamp=20.0), np.float64)
  assert np.isfinite(values).all()
  # Values: exact k3 below the clamp; above it k3(20) + (e^20 − 1)(149 − 20) (the tangent line).
  k3_20 = np.expm1(20.0) - 20.0
  np.testing.assert_allclose(values, [0.0, k3_20 + np.expm1(20.0) * 129.0, np.exp(-149.0) + 148.0,
                                      np.exp(-4.0) + 3.0], rtol=1e-5)


def test_exp_clamped_rule():
  x = jnp.array([-jnp.inf, -200.0, 0.0, 20.0, 30.0, jnp.inf])
  v = kljax.estimators.exp_clamped(x, 20.0)
  g = jax.grad(lambda y: kljax.estimators.exp_clamped(y, 20.0).sum())(x)
  np.testing.assert_allclose(v[:5], [0.0, 0.0, 1.0, np.exp(20.0), np.exp(20.0) * 11.0],  # e^−200 underflows
                             rtol=1e-6)
  assert v[5] == np.inf
  np.testing.assert_allclose(g, [0.0, 0.0, 1.0, np.exp(20.0), np.exp(20.0), np.exp(20.0)], rtol=1e-6)


# ---- Schulman, "Approximating KL Divergence" (2020): q = N(0,1) samples, p = N(μ,1). ----
# log r = log p(x) − log q(x) = μx − μ²/2 ~ N(−μ²/2, μ²); true KL[q‖p] = μ²/2. Closed forms:
#   k1 = −log r:      std = μ
#   k2 = ½ (log r)²:  E = ½(μ² + μ⁴/4), so bias/true = μ²/4; Var = m²s² + s⁴/2 with m = −μ²/2, s = μ
#   k3 = r − 1 − log r: unbiased, Var = e^{μ²} − 1 − μ²
def _closed_form(mu):
  true = mu**2 / 2
  m, s = -(mu**2) / 2, mu
  std = {
      "k1": mu,
      "k2": np.sqrt(m**2 * s**2 + s**4 / 2),
      "k3": np.sqrt(np.exp(mu**2) - 1 - mu**2),
  }
  bias = {"k1": 0.0, "k2": mu**2 / 4, "k3": 0.0}
  return true, {k: (bias[k], std[k] / true) for k in std}


@pytest.mark.parametrize(
    "mu,published",
    [
        # Schulman's table: (bias/true, std/true) for k1, k2, k3.
        (0.1, {"k1": (0.0, 20.0), "k2": (0.002, 1.42), "k3": (0.0, 1.42)}),
        (1.0, {"k1": (0.0, 2.0), "k2": (0.25, 1.73), "k3": (0.0, 1.7)}),
    ],
)
def test_schulman_gaussian_table(mu, published):
  n = 4_000_000
  x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
  logq = -0.5 * x**2  # normalizing constants cancel in every estimator
  logp = -0.5 * (x - mu) ** 2
  true, closed = _closed_form(mu)
  for name, fn in [("k1", kljax.k1), ("k2", kljax.k2), ("k3", kljax.k3)]:
    stats = kljax.montecarlo.value_stats(fn(logq, logp), true)
    closed_bias, closed_std = closed[name]
    # Monte Carlo agrees with the closed form within 5 standard errors ...
    assert abs(stats.relative_bias - closed_bias) < 5 * stats.stderr / true + 1e-6, (name, stats)
    assert stats.relative_std == pytest.approx(closed_std, rel=0.02), (name, stats)
    # ... and with Schulman's published (rounded) figures.
    pub_bias, pub_std = published[name]
    assert abs(stats.relative_bias - pub_bias) < 0.01 + 5 * stats.stderr / true, (name, stats)
    assert stats.relative_std == pytest.approx(pub_std, rel=0.03), (name, stats)
  # k3 is unbiased, so bias(k2) = E[k2 − k3]: the paired difference resolves μ²/4 sharply.
  paired = kljax.montecarlo.value_stats(kljax.k2(logq, logp) - kljax.k3(logq, logp), 0.0)
  assert paired.mean / true == pytest.approx(mu**2 / 4, abs=5 * paired.stderr / true)
  assert paired.stderr / true < mu**2 / 40


def test_value_stats_sample_scaling():
  v = jax.random.normal(jax.random.PRNGKey(1), (100_000,)) + 3.0
  s1 = kljax.montecarlo.value_stats(v, 3.0, num_samples=1)
  s16 = kljax.montecarlo.value_stats(v, 3.0, num_samples=16)
  assert s1.std == pytest.approx(1.0, rel=0.02)
  assert s16.std == pytest.approx(0.25, rel=0.02)
