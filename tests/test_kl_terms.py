"""KL terms element by element against NumPy: coefficients, surrogate gradients, corrections, names."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import kljax

# The coefficient table (README "Which KL does each choice descend?"), written in NumPy from the
# derivation (d = log δ = ref − logp).
NP_COEFFICIENT = {
    "k1_in_reward": lambda d: -d,
    "k1_as_loss": lambda d: np.ones_like(d),
    "k2_as_loss": lambda d: -d,
    "k3_as_loss": lambda d: 1 - np.exp(d),
    "k2_in_reward": lambda d: 0.5 * d**2,
    "k3_in_reward": lambda d: np.exp(d) - 1 - d,
    "k3_value_k2_grad": lambda d: -d,
    "k2_value_k3_grad": lambda d: 1 - np.exp(d),
    "k1_value_k3_grad": lambda d: 1 - np.exp(d),
}
NP_VALUE = {"k1": lambda d: -d, "k2": lambda d: 0.5 * d**2, "k3": lambda d: np.exp(d) - 1 - d}


@pytest.fixture
def pair(rng):
  logp = rng.normal(-2.0, 1.0, (3, 5)).astype(np.float32)
  ref = (logp + rng.normal(0.0, 0.7, (3, 5))).astype(np.float32)
  return logp, ref, ref.astype(np.float64) - logp


def test_straight_through_forward_value_and_gradient(pair):
  logp, ref, d = pair
  term = kljax.straight_through(value=kljax.k3, grad=kljax.k2)
  np.testing.assert_allclose(term.surrogate(logp, ref), NP_VALUE["k3"](d), rtol=2e-5, atol=2e-6)
  g = jax.grad(lambda lp: term.surrogate(lp, ref).sum())(jnp.asarray(logp))
  np.testing.assert_allclose(g, -d, rtol=2e-5, atol=2e-6)


def _np_rho(logp, old):
  return np.exp(np.asarray(logp, np.float64) - old)


class KLTermVariantsTest(chex.TestCase):
  """The table's terms element by element, under jax.jit and without it (chex variants)."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.logp = rng.normal(-2.0, 1.0, (3, 5)).astype(np.float32)
    self.ref = (self.logp + rng.normal(0.0, 0.7, (3, 5))).astype(np.float32)
    self.d = self.ref.astype(np.float64) - self.logp
    self.old = (self.logp + rng.normal(0.0, 0.3, self.logp.shape)).astype(np.float32)

  def _grad(self, term, old=None):
    g = self.variant(jax.grad(lambda lp, ref, o: term.surrogate(lp, ref, o).sum()))
    return g(jnp.asarray(self.logp), self.ref, old)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sorted(NP_COEFFICIENT))
  def test_coefficient_matches_table(self, name):
    term = kljax.kl_term(name)
    np.testing.assert_allclose(self.variant(term.coefficient)(self.logp, self.ref),
                               NP_COEFFICIENT[name](self.d), rtol=2e-5, atol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sorted(NP_COEFFICIENT))
  def test_on_policy_surrogate_gradient_is_coefficient(self, name):
    # Per element, ∂ surrogate/∂logp = c on-policy: "every variant is coefficient × score".
    np.testing.assert_allclose(self._grad(kljax.kl_term(name)), NP_COEFFICIENT[name](self.d),
                               rtol=2e-5, atol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sorted(NP_COEFFICIENT))
  def test_value_is_the_named_estimate(self, name):
    estimator = name.split("_")[0]  # the value of "k3_value_k2_grad" is k3
    np.testing.assert_allclose(self.variant(kljax.kl_term(name).value)(self.logp, self.ref),
                               NP_VALUE[estimator](self.d), rtol=2e-5, atol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_off_policy_corrections_elementwise(self):
    d, old = self.d, self.old
    rho = _np_rho(self.logp, old)
    k2 = 0.5 * d**2
    grad = lambda name: self._grad(kljax.kl_term(name), old)
    # sg(ρ)·k2: gradient ρ·(logp − ref).
    np.testing.assert_allclose(grad("k2_as_loss+detached_ratio"), rho * -d, rtol=1e-4)
    # ρ·k2 with ρ live: gradient ρ·k2 + ρ·(logp − ref).
    np.testing.assert_allclose(grad("k2_as_loss+ratio"), rho * (k2 - d), rtol=1e-4)
    # no correction: plain ∂k2/∂logp.
    np.testing.assert_allclose(grad("k2_as_loss"), -d, rtol=1e-4, atol=1e-6)
    # in reward: sg(k1)·ρ, gradient k1·ρ.
    np.testing.assert_allclose(grad("k1_in_reward"), -d * rho, rtol=1e-4)
    # verl's value-clamped k3, off-policy: as loss it ignores π_old (inside the clamp, 1 − δ).
    np.testing.assert_allclose(grad("k3_as_loss+value_clamp"),
                               np.where(np.expm1(d) - d < 10.0, -np.expm1(d), 0.0), rtol=1e-4,
                               atol=1e-6)


def test_reward_to_go_matches_loop(rng):
  values = rng.normal(size=(3, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], bool)
  expected = np.zeros_like(values, dtype=np.float64)
  for b in range(3):
    for t in range(6):
      if mask[b, t]:
        expected[b, t] = sum(values[b, s] for s in range(t, 6) if mask[b, s])
  np.testing.assert_allclose(kljax.reward_to_go(values, mask), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      kljax.reward_to_go(values), np.cumsum(values[:, ::-1], -1)[:, ::-1], rtol=1e-5, atol=1e-6
  )


def test_rtg_in_reward_coefficient_and_mask(pair):
  logp, ref, d = pair
  mask = np.array([[1, 1, 1, 1, 0]] * 3, bool)
  term = kljax.kl_term("k1_in_reward_rtg")
  k1 = np.where(mask, -d, 0.0)
  expected = np.where(mask, np.cumsum(k1[:, ::-1], -1)[:, ::-1], 0.0)
  np.testing.assert_allclose(term.coefficient(logp, ref, mask=mask), expected, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda lp: term.surrogate(lp, ref, mask=mask).sum())(jnp.asarray(logp))
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def test_kl_term_resolves_every_listed_name():
  names = kljax.kl_term_names()
  for required in [
      "k1_in_reward", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k2_in_reward", "k3_in_reward",
      "k3_value_k2_grad", "k1_in_reward_rtg", "k2_as_loss+detached_ratio", "k3_as_loss+ratio",
      "k2_as_loss+clipped", "k3_value_k2_grad+clipped",
  ]:
    assert required in names
  for name in names:
    term = kljax.kl_term(name)
    assert term.name == name
    assert term.placement == ("reward" if "in_reward" in name else "loss")


@pytest.mark.parametrize("bad", ["k4_as_loss", "k2_as_loss+magic", "k1_in_reward+ratio",
                                 "k2_value_k2_grad", "kl", ""])
def test_kl_term_unknown_name_lists_valid_names(bad):
  with pytest.raises(ValueError, match="Valid names: ") as err:
    kljax.kl_term(bad)
  for listed in ["k2_as_loss", "k1_in_reward_rtg", "k3_value_k2_grad", "+detached_ratio", "+clipped"]:
    assert listed in str(err.value)
  assert repr(bad) in str(err.value)


@pytest.mark.parametrize("length", [129, 1000, 4096])
def test_reward_to_go_long_sequences_blocked_path(rng, length):
  # Long sequences take the blocked-matmul path (with padding when T is not a multiple of 64).
  values = rng.normal(size=(2, length)).astype(np.float32)
  mask = rng.random((2, length)) > 0.3
  masked = np.where(mask, values, 0.0).astype(np.float64)
  expected = np.where(mask, np.cumsum(masked[:, ::-1], -1)[:, ::-1], 0.0)
  got = np.asarray(kljax.reward_to_go(values, mask))
  assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


# ---- The coefficient contract for every name (+ratio included), from NumPy derivatives ----

NP_DERIVATIVE = {"k1": lambda d: np.ones_like(d), "k2": lambda d: -d, "k3": lambda d: 1 - np.exp(d)}


def _np_coefficient(name, d):
  """Hand rule: in reward c = k (reward-to-go: Σ_{s≥t}); as loss c = ∂k_grad/∂logp, and a live
  ratio adds the value k_value (product rule, since ∇ρ = ∇logp on-policy); verl's value clamp
  (k3 clipped to [−10, 10]) zeroes c where k3 > 10."""
  base, _, correction = name.partition("+")
  if correction == "value_clamp":
    return np.where(NP_VALUE["k3"](d) < 10.0, NP_DERIVATIVE["k3"](d), 0.0)
  if "_in_reward" in base:
    c = NP_VALUE[base[:2]](d)
    return np.flip(np.cumsum(np.flip(c, -1), -1), -1) if base.endswith("_rtg") else c
  value_est, grad_est = (base[:2], base[:2]) if base.endswith("_as_loss") else (base[:2], base[-7:-5])
  c = NP_DERIVATIVE[grad_est](d)
  return c + NP_VALUE[value_est](d) if correction == "ratio" else c


@pytest.mark.parametrize("name", kljax.kl_term_names())
def test_coefficient_is_the_on_policy_gradient_for_every_name(name, pair):
  logp, ref, d = pair
  term = kljax.kl_term(name)
  expected = _np_coefficient(name, d)
  g = jax.grad(lambda lp: term.surrogate(lp, ref).sum())(jnp.asarray(logp))
  np.testing.assert_allclose(g, expected, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(term.coefficient(logp, ref), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", kljax.kl_term_names())
def test_masked_minus_inf_gives_no_nan(name):
  # Padding often carries log-prob −inf; masked before the maths it must not reach exp() or grad.
  logp = jnp.array([[-1.0, -jnp.inf, -0.5]])
  ref = jnp.array([[-1.5, -jnp.inf, -jnp.inf]])
  old = jnp.array([[-1.2, -jnp.inf, 0.0]])
  mask = jnp.array([[True, False, False]])
  term = kljax.kl_term(name)
  for old_logp in (None, old):
    out, g = jax.value_and_grad(lambda lp: term.surrogate(lp, ref, old_logp, mask=mask).sum())(logp)
    assert np.isfinite(out) and np.all(np.isfinite(g)), (name, old_logp, out, g)
    assert np.all(np.asarray(g)[0, 1:] == 0.0)
  assert np.all(np.isfinite(term.coefficient(logp, ref, mask=mask)))
  assert np.all(np.isfinite(term.value(logp, ref, mask=mask)))
