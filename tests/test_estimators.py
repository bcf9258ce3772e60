"""Estimators against NumPy formulas, exact KL against NumPy, clamps, and Schulman's Gaussian table."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import kljax


def _np_logsoftmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


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


# ---- Under jax.jit and without it (chex variants): the values and gradients must not change. ----


class EstimatorVariantsTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.logp = rng.normal(-2.0, 1.0, (4, 7)).astype(np.float32)
    self.ref = rng.normal(-2.0, 1.0, (4, 7)).astype(np.float32)
    self.log_delta = self.ref.astype(np.float64) - self.logp

  @chex.variants(with_jit=True, without_jit=True)
  def test_k_values_match_numpy(self):
    d = self.log_delta
    for fn, expected in [(kljax.k1, -d), (kljax.k2, 0.5 * d**2), (kljax.k3, np.exp(d) - 1 - d)]:
      np.testing.assert_allclose(self.variant(fn)(self.logp, self.ref), expected, rtol=1e-5,
                                 atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("reverse", "forward")
  def test_exact_kl_matches_numpy(self, direction):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 11)) * 2
    ref_logits = rng.normal(size=(3, 4, 11)) * 2
    lp, lq = _np_logsoftmax(logits), _np_logsoftmax(ref_logits)
    if direction == "forward":
      lp, lq = lq, lp
    expected = (np.exp(lp) * (lp - lq)).sum(-1)
    kl = self.variant(lambda a, b: kljax.exact_kl(a, b, direction=direction))
    got = kl(logits.astype(np.float32), ref_logits.astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_exp_clamped_rule(self):
    x = jnp.array([-jnp.inf, -200.0, 0.0, 20.0, 30.0, jnp.inf])
    fn = self.variant(lambda y: kljax.estimators.exp_clamped(y, 20.0))
    v = fn(x)
    g = self.variant(jax.grad(lambda y: kljax.estimators.exp_clamped(y, 20.0).sum()))(x)
    np.testing.assert_allclose(v[:5], [0.0, 0.0, 1.0, np.exp(20.0), np.exp(20.0) * 11.0],
                               rtol=1e-6)  # e^−200 underflows
    assert v[5] == np.inf
    np.testing.assert_allclose(g, [0.0, 0.0, 1.0, np.exp(20.0), np.exp(20.0), np.exp(20.0)],
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_k3_value_clamped_is_verl_low_var_kl(self):
    # verl's rule, by hand in NumPy: x = clip(ref − logp, −20, 20); clip(eˣ − x − 1, −10, 10).
    # Gradient in logp: −(eˣ − 1) = 1 − δ where |k3| < 10, and 0 where the value clamp is active.
    log_delta = np.array([0.0, 1.0, 2.5, 2.7, 5.0, 30.0, -3.0, -10.9, -11.1, -40.0])
    logp = np.full(log_delta.shape, -1.0, np.float32)
    ref = (logp + log_delta).astype(np.float32)
    d = np.clip(ref.astype(np.float64) - logp, -20.0, 20.0)
    k3 = np.exp(d) - d - 1.0
    expected = np.clip(k3, -10.0, 10.0)
    expected_grad = np.where(np.abs(k3) < 10.0, 1.0 - np.exp(d), 0.0)
    np.testing.assert_allclose(self.variant(kljax.estimators.k3_value_clamped)(logp, ref),
                               expected, rtol=1e-5, atol=1e-6)
    term = kljax.kl_term("k3_as_loss+value_clamp")
    g = self.variant(jax.grad(lambda lp: term.surrogate(lp, ref).sum()))(jnp.asarray(logp))
    np.testing.assert_allclose(g, expected_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(term.coefficient(logp, ref), expected_grad, rtol=1e-5, atol=1e-6)
    # The count: elements past the clamp (here log δ = 2.7, 5, 30, −11.1, −40), masked ones not.
    assert int(self.variant(term.count_clamped)(logp, ref)) == 5
    mask = np.arange(log_delta.size) != 4
    assert int(self.variant(lambda a, b, m: term.count_clamped(a, b, mask=m))(logp, ref, mask)) == 4
    assert int(kljax.estimators.count_value_clamped(logp, ref)) == int(np.sum(k3 > 10.0))
    assert kljax.kl_term("k3_as_loss").count_clamped is None


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


def test_kl_from_log_probs_numpy_float64_and_jax_float32(rng):
  # One formula for host-side reports (NumPy in, float64 out) and traced code (JAX in, JAX out).
  lp, lq = _np_logsoftmax(rng.normal(size=(2, 5))), _np_logsoftmax(rng.normal(size=(2, 5)))
  expected = np.array([sum(np.exp(a) * (a - b) for a, b in zip(x, y)) for x, y in zip(lp, lq)])
  host = kljax.estimators.kl_from_log_probs(lp, lq)
  assert isinstance(host, np.ndarray) and host.dtype == np.float64
  np.testing.assert_allclose(host, expected, rtol=1e-12)
  traced = jax.jit(kljax.estimators.kl_from_log_probs)(jnp.asarray(lp, jnp.float32),
                                                        jnp.asarray(lq, jnp.float32))
  assert traced.dtype == jnp.float32
  np.testing.assert_allclose(traced, expected, rtol=1e-5)
