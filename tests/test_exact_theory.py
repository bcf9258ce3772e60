"""The paper's table, proved by exact enumeration against closed forms derived by hand (NumPy, float64).

For a categorical policy p = softmax(θ) the score of outcome y is ∇_θ log p_y = e_y − p, so a term
with per-outcome coefficient c_y, sampled from s with per-sample weight w_y, has expected gradient
Σ_y s_y w_y c_y (e_y − p). Closed forms: ∇KL(p‖q) = p ⊙ (log p − log q − KL(p‖q)), ∇KL(q‖p) = p − q.
"""

import itertools

import chex
import jax
import numpy as np
import pytest

import kljax
from kljax import exact

TOL = 1e-6


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@pytest.fixture
def cat(rng):
  theta = rng.normal(size=6) * 1.2
  p = _softmax(theta)
  q = _softmax(rng.normal(size=6) * 1.2)
  near_old = _softmax(theta + rng.uniform(-0.08, 0.08, size=6))  # ratios within [0.8, 1.2]
  far_old = _softmax(rng.normal(size=6) * 1.2)
  return dict(theta=theta, p=p, q=q, old=far_old, near_old=near_old)


def _np_expected(s, w, c, p):
  return (s * w * c) @ (np.eye(len(p)) - p[None, :])


def _np_rkl_grad(p, q):
  d = np.log(p) - np.log(q)
  return p * (d - np.sum(p * d))


def _oracle(name, cat, old=None, **options):
  term = kljax.kl_term(name, **options)
  ref = exact.categorical_from_probs(cat["q"], name="ref")
  old = None if old is None else exact.categorical_from_probs(old, name="old")
  return np.asarray(exact.expected_gradient(term, exact.categorical(cat["theta"]), ref, old=old)[0])


# The on-policy column of the table, each entry derived by hand.
def _on_policy_expectation(base, p, q):
  d = np.log(q) - np.log(p)  # log δ
  rkl, fkl = _np_rkl_grad(p, q), p - q
  return {
      "k1_in_reward": rkl,
      "k1_as_loss": np.zeros_like(p),
      "k2_as_loss": rkl,  # Thm 5.1
      "k3_as_loss": fkl,
      "k2_in_reward": _np_expected(p, 1.0, 0.5 * d**2, p),  # biased
      "k3_in_reward": rkl - fkl,
      "k3_value_k2_grad": rkl,
  }[base]


BASES = ["k1_in_reward", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k2_in_reward", "k3_in_reward",
         "k3_value_k2_grad"]


@pytest.mark.parametrize("base", BASES)
def test_table_row_on_policy(base, cat):
  expected = _on_policy_expectation(base, cat["p"], cat["q"])
  np.testing.assert_allclose(_oracle(base, cat), expected, atol=TOL)


@pytest.mark.parametrize("base", BASES)
def test_table_row_off_policy_with_importance_sampling(base, cat):
  # Off-policy, with the ratio applied (automatic in reward, "+detached_ratio" as loss), every row
  # recovers its on-policy expectation exactly.
  name = base if "in_reward" in base else base + "+detached_ratio"
  expected = _on_policy_expectation(base, cat["p"], cat["q"])
  np.testing.assert_allclose(_oracle(name, cat, old=cat["old"]), expected, atol=TOL)


def test_named_equalities_on_policy(cat):
  rkl = _np_rkl_grad(cat["p"], cat["q"])
  assert np.abs(_oracle("k1_as_loss", cat)).max() < TOL  # no regularization at all
  np.testing.assert_allclose(_oracle("k2_as_loss", cat), _oracle("k1_in_reward", cat), atol=TOL)
  np.testing.assert_allclose(_oracle("k2_as_loss", cat), rkl, atol=TOL)
  np.testing.assert_allclose(_oracle("k3_as_loss", cat), cat["p"] - cat["q"], atol=TOL)
  # and k3 as loss really is not the reverse-KL gradient:
  assert np.abs(_oracle("k3_as_loss", cat) - rkl).max() > 1e-2
  assert np.abs(_oracle("k2_in_reward", cat) - rkl).max() > 1e-2


def test_off_policy_k2_as_loss_is_biased_and_corrections_remove_it(cat):
  p, q, o = cat["p"], cat["q"], cat["old"]
  rkl = _np_rkl_grad(p, q)
  d = np.log(q) - np.log(p)
  uncorrected = _oracle("k2_as_loss", cat, old=o)
  np.testing.assert_allclose(uncorrected, _np_expected(o, 1.0, -d, p), atol=TOL)
  assert np.abs(uncorrected - rkl).max() > 1e-2
  np.testing.assert_allclose(_oracle("k2_as_loss+detached_ratio", cat, old=o), rkl, atol=TOL)
  # The clipped head equals ∇RKL while every ratio is inside the clip range ...
  rho = p / cat["near_old"]
  assert np.all((rho > 0.8) & (rho < 1.2))
  np.testing.assert_allclose(_oracle("k2_as_loss+clipped", cat, old=cat["near_old"]), rkl, atol=TOL)
  # ... and outside it drops exactly the elements PPO's pessimistic bound drops.
  rho, c = p / o, -d
  active = rho * c >= np.clip(rho, 0.8, 1.2) * c
  np.testing.assert_allclose(
      _oracle("k2_as_loss+clipped", cat, old=o), _np_expected(o, np.where(active, rho, 0.0), c, p),
      atol=TOL,
  )


def test_off_policy_live_ratio(cat):
  p, q, o = cat["p"], cat["q"], cat["old"]
  d = np.log(q) - np.log(p)
  # k3 with a live ratio: ∇E_old[ρ k3] = ∇E_p[k3] = ∇RKL exactly.
  np.testing.assert_allclose(_oracle("k3_as_loss+ratio", cat, old=o), _np_rkl_grad(p, q), atol=TOL)
  # k2 with a live ratio: ∇E_p[k2] = Σ p (k2 − d)(e − p): biased.
  k2_ratio = _np_expected(p, 1.0, 0.5 * d**2 - d, p)
  np.testing.assert_allclose(_oracle("k2_as_loss+ratio", cat, old=o), k2_ratio, atol=TOL)
  assert np.abs(k2_ratio - _np_rkl_grad(p, q)).max() > 1e-2
  # k3 as loss uncorrected off-policy is neither gradient.
  k3_off = _oracle("k3_as_loss", cat, old=o)
  np.testing.assert_allclose(k3_off, _np_expected(o, 1.0, 1 - np.exp(d), p), atol=TOL)
  assert np.abs(k3_off - (p - q)).max() > 1e-2


def test_categorical_closed_forms_equal_autodiff_of_definition(cat):
  policy, ref = exact.categorical(cat["theta"]), exact.categorical_from_probs(cat["q"])
  np.testing.assert_allclose(exact.rkl_grad(policy, ref)[0],
                             exact.categorical_rkl_grad(cat["theta"], cat["q"]), atol=TOL)
  np.testing.assert_allclose(exact.fkl_grad(policy, ref)[0],
                             exact.categorical_fkl_grad(cat["theta"], cat["q"]), atol=TOL)
  np.testing.assert_allclose(exact.categorical_rkl_grad(cat["theta"], cat["q"]),
                             _np_rkl_grad(cat["p"], cat["q"]), atol=TOL)


# ---- Autoregressive tabular policy (V=3, T=3): sequence level ----


@pytest.fixture
def ar():
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  return [exact.random_tabular(k, vocab=3, length=3, scale=1.0) for k in keys]


def _np_sequence_kl(policy, ref):
  """Σ_y P(y) log P(y)/Q(y), P by explicit products of NumPy softmaxes over every sequence."""

  def prob(tables, y):
    return np.prod([_softmax(np.asarray(t, np.float64)[tuple(y[:i])])[y[i]]
                    for i, t in enumerate(tables)])

  total = 0.0
  for y in itertools.product(range(3), repeat=len(policy)):
    pp, qq = prob(policy, y), prob(ref, y)
    total += pp * np.log(pp / qq)
  return total


def test_sequence_kl_and_gradient_against_finite_differences(ar):
  policy, ref, _ = ar
  np.testing.assert_allclose(exact.reverse_kl(policy, ref), _np_sequence_kl(policy, ref), rtol=1e-10)
  np.testing.assert_allclose(exact.forward_kl(policy, ref), _np_sequence_kl(ref, policy), rtol=1e-10)
  g, g_f = exact.rkl_grad(policy, ref), exact.fkl_grad(policy, ref)
  h = 1e-6
  for t, table in enumerate(policy):
    flat = np.asarray(table, np.float64).reshape(-1)
    for i in range(0, flat.size, 4):  # a spread of coordinates
      def shifted(eps):
        x = flat.copy()
        x[i] += eps
        return tuple(np.asarray(policy[s]) if s != t else x.reshape(table.shape)
                     for s in range(len(policy)))
      fd = (_np_sequence_kl(shifted(h), ref) - _np_sequence_kl(shifted(-h), ref)) / (2 * h)
      fd_f = (_np_sequence_kl(ref, shifted(h)) - _np_sequence_kl(ref, shifted(-h))) / (2 * h)
      assert np.asarray(g[t]).reshape(-1)[i] == pytest.approx(fd, abs=1e-7)
      assert np.asarray(g_f[t]).reshape(-1)[i] == pytest.approx(fd_f, abs=1e-7)


def _ar_grad(name, policy, ref, old=None, level="token"):
  return exact.expected_gradient(kljax.kl_term(name), policy, ref, old=old, level=level)


def test_token_level_rtg_equals_sequence_rkl_but_per_token_k2_does_not(ar):
  policy, ref, _ = ar
  rkl = exact.rkl_grad(policy, ref)
  frozen = exact.frozen_prefix_rkl_grad(policy, ref)
  chex.assert_trees_all_close(_ar_grad("k1_in_reward_rtg", policy, ref), rkl, atol=TOL, rtol=0)
  for name in ["k2_as_loss", "k1_in_reward", "k3_value_k2_grad"]:
    g = _ar_grad(name, policy, ref)
    chex.assert_trees_all_close(g, frozen, atol=TOL, rtol=0, custom_message=name)
    assert exact.tree_distance(g, rkl) > 1e-3, name  # the gap is real, not rounding
  assert exact.tree_distance(frozen, rkl) > 1e-3


def test_sequence_level_rows(ar):
  policy, ref, _ = ar
  rkl, fkl = exact.rkl_grad(policy, ref), exact.fkl_grad(policy, ref)
  for name in ["k1_in_reward", "k2_as_loss", "k3_value_k2_grad", "k1_in_reward_rtg"]:
    chex.assert_trees_all_close(_ar_grad(name, policy, ref, level="sequence"), rkl, atol=TOL,
                                rtol=0, custom_message=name)
  chex.assert_trees_all_close(_ar_grad("k3_as_loss", policy, ref, level="sequence"), fkl,
                              atol=TOL, rtol=0)
  assert exact.tree_norm(_ar_grad("k1_as_loss", policy, ref, level="sequence")) < TOL


def test_sequence_level_off_policy(ar):
  policy, ref, old = ar
  rkl = exact.rkl_grad(policy, ref)
  for name in ["k2_as_loss+detached_ratio", "k3_as_loss+ratio", "k1_in_reward",
               "k3_value_k2_grad+detached_ratio"]:
    chex.assert_trees_all_close(_ar_grad(name, policy, ref, old=old, level="sequence"), rkl,
                                atol=TOL, rtol=0, custom_message=name)
  assert exact.tree_distance(_ar_grad("k2_as_loss", policy, ref, old=old, level="sequence"),
                             rkl) > 1e-2


# ---- Optima ----


def test_reverse_kl_optimum_is_stationary_and_maximal(rng):
  q = _softmax(rng.normal(size=7))
  r = rng.normal(size=7)
  beta = 0.3
  pi = exact.optimum_reverse(q, r, beta)
  objective = lambda x: x @ r - beta * np.sum(x * np.log(x / q))
  stationarity = r - beta * (np.log(pi) - np.log(q))  # constant (= the multiplier) at the optimum
  assert np.ptp(stationarity) < 1e-10
  for _ in range(50):
    other = _softmax(np.log(pi) + 0.1 * rng.normal(size=7))
    assert objective(other) < objective(pi)


def test_forward_kl_optimum_is_stationary_and_maximal(rng):
  q = _softmax(rng.normal(size=7))
  r = rng.normal(size=7)
  beta = 0.3
  pi = exact.optimum_forward(q, r, beta)
  assert pi.sum() == pytest.approx(1.0, abs=1e-12)
  objective = lambda x: x @ r - beta * np.sum(q * np.log(q / x))
  stationarity = r + beta * q / pi
  assert np.ptp(stationarity) < 1e-8
  for _ in range(50):
    other = _softmax(np.log(pi) + 0.1 * rng.normal(size=7))
    assert objective(other) < objective(pi)
  assert exact.tv_distance(pi, exact.optimum_reverse(q, r, beta)) > 1e-2


def test_unregularized_optimum_and_tv():
  np.testing.assert_allclose(exact.optimum_unregularized([0.0, 2.0, 1.0, 2.0]), [0, 0.5, 0, 0.5])
  assert exact.tv_distance([1.0, 0.0], [0.25, 0.75]) == pytest.approx(0.75)


# ---- Monte Carlo gradients agree with the oracle ----


@pytest.mark.parametrize("name", ["k2_as_loss", "k3_as_loss", "k1_as_loss", "k1_in_reward"])
def test_sampled_gradient_unbiased_around_oracle(name):
  with jax.enable_x64(False):
    logits = jax.numpy.array([0.3, -1.0, 0.8, 0.0])
    ref_logits = jax.numpy.array([0.0, 0.5, -0.5, 0.2])
    trials = 2000
    stats = kljax.montecarlo.gradient_stats(kljax.kl_term(name), logits, ref_logits,
                                            jax.random.PRNGKey(3), num_samples=8, num_trials=trials)
    # the bias of the mean of `trials` gradients is within 5 standard errors of zero
    assert stats.bias_norm < 5 * stats.std_norm / np.sqrt(trials)
    assert stats.std_norm > 0
