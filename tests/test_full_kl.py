"""Exact per-position KL terms (kljax.full_kl): which gradient each follows, proved by exact
enumeration against the divergences' own definitions; the chunked path against NumPy; no [B, T, V]
buffer; the top-k + tail estimate unbiased by enumerating its tail draws."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import exact, full_kl, logprobs


@pytest.fixture
def float64():
  with jax.enable_x64(True):
    yield


def _policies(vocab, length, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  pol = exact.random_tabular(k[0], vocab=vocab, length=length, scale=0.8)
  ref = exact.random_tabular(k[1], vocab=vocab, length=length, scale=0.8)
  noise = jax.random.split(k[2], length)
  old = tuple(p + 0.4 * jax.random.normal(kk, p.shape, p.dtype) for p, kk in zip(pol, noise))
  return pol, ref, old


def _expected(term, pol, ref, old):
  def surrogate(logits, ref_logits, tokens, old_logp):
    return full_kl.logits_surrogate(term, logits, ref_logits, tokens, old_logp)

  return exact.expected_gradient_full(surrogate, pol, ref, old=old)


TARGETS = {
    # name -> the analytic gradient it must equal (prefixes: the law that sampled the data)
    "exact_rkl_as_loss": lambda pol, ref, old: exact.frozen_prefix_rkl_grad(pol, ref, prefixes=old),
    "exact_fkl_as_loss": lambda pol, ref, old: exact.frozen_prefix_fkl_grad(pol, ref, prefixes=old),
    "exact_rkl_rb": lambda pol, ref, old: exact.rkl_grad(pol, ref),
}
TERMS = {
    "exact_rkl_as_loss": full_kl.full_kl_term(),
    "exact_fkl_as_loss": full_kl.full_kl_term(direction="forward"),
    "exact_rkl_rb": full_kl.full_kl_term(credit="sequence"),
}


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("name", list(TERMS))
def test_sequence_terms_follow_their_divergence_exactly(float64, name, off_policy):
  pol, ref, old = _policies(3, 3)
  old = old if off_policy else None
  got = _expected(TERMS[name], pol, ref, old)
  want = TARGETS[name](pol, ref, old)
  assert exact.tree_norm(want) > 0.1
  assert exact.tree_distance(got, want) < 1e-6
  # and not the other targets: the frozen-prefix and sequence gradients differ here
  if name == "exact_rkl_rb":
    assert exact.tree_distance(got, exact.frozen_prefix_rkl_grad(pol, ref, prefixes=old)) > 1e-2
  if name == "exact_rkl_as_loss":
    assert exact.tree_distance(got, exact.rkl_grad(pol, ref)) > 1e-2


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("name", list(TERMS))
def test_one_token_terms_equal_the_closed_forms(float64, name, off_policy):
  """Token level: one position, whatever policy sampled the token (the exact KL does not read it)."""
  rng = np.random.default_rng(3)
  logits, ref_logits, old_logits = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
  q = np.exp(ref_logits) / np.exp(ref_logits).sum()
  old = exact.categorical(old_logits) if off_policy else None
  got = _expected(TERMS[name], exact.categorical(logits), exact.categorical(ref_logits), old)[0]
  if name == "exact_fkl_as_loss":
    p = np.exp(logits) / np.exp(logits).sum()
    want = p - q  # ∂KL(q‖p)/∂z
  else:
    p = np.exp(logits) / np.exp(logits).sum()
    kl = np.sum(p * np.log(p / q))
    want = p * (np.log(p / q) - kl)  # ∂KL(p‖q)/∂z
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_rb_with_frozen_prefix_is_k1_rtg_with_its_current_token_averaged(float64):
  """The Rao-Blackwellized surrogate's score coefficient at token s is Σ_{t>s} KL_t: on one fixed
  sequence, check the gradient w.r.t. each token's log-prob by hand (NumPy)."""
  kl = jnp.array([[0.3, 0.1, 0.5, 0.2]])
  logp = jnp.array([[-1.0, -0.5, -2.0, -0.1]])
  grad_logp = jax.grad(lambda lp: jnp.sum(full_kl.sequence_surrogate(kl, lp)))(logp)
  np.testing.assert_allclose(grad_logp, [[0.8, 0.7, 0.2, 0.0]], atol=1e-12)
  grad_kl = jax.grad(lambda k: jnp.sum(full_kl.sequence_surrogate(k, logp)))(kl)
  np.testing.assert_allclose(grad_kl, np.ones((1, 4)), atol=1e-12)
  # a masked middle token gives neither a KL nor a score
  mask = jnp.array([[True, False, True, True]])
  g = jax.grad(lambda lp: jnp.sum(full_kl.sequence_surrogate(kl, lp, mask=mask)))(logp)
  np.testing.assert_allclose(g, [[0.7, 0.0, 0.2, 0.0]], atol=1e-12)


def _np_kl(h, w, rh, rw):
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  rz = np.asarray(rh, np.float64) @ np.asarray(rw, np.float64)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  lq = rz - np.log(np.exp(rz).sum(-1, keepdims=True))
  p, q = np.exp(lp), np.exp(lq)
  rev = (p * (lp - lq)).sum(-1)
  fwd = (q * (lq - lp)).sum(-1)
  dz_rev = p * (lp - lq - rev[..., None])  # ∂KL(p‖q)/∂z
  return rev, fwd, dz_rev, z


@pytest.fixture
def hidden():
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  b, t, d, v = 2, 5, 8, 40
  return (jax.random.normal(k[0], (b, t, d)), 0.5 * jax.random.normal(k[1], (d, v)),
          jax.random.normal(k[2], (b, t, d)), 0.5 * jax.random.normal(k[3], (d, v)))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_position_kl_matches_numpy_values_and_gradient(hidden, chunk):
  h, w, rh, rw = hidden
  rev, fwd = logprobs.position_kl(h, w, rh, rw, chunk_size=chunk)
  np_rev, np_fwd, dz, _ = _np_kl(h, w, rh, rw)
  np.testing.assert_allclose(rev, np_rev, atol=1e-5)
  np.testing.assert_allclose(fwd, np_fwd, atol=1e-5)
  gh, gw = jax.grad(lambda h, w: jnp.sum(logprobs.position_kl(h, w, rh, rw, chunk_size=chunk)[0]),
                    argnums=(0, 1))(h, w)
  np.testing.assert_allclose(gh, dz @ np.asarray(w, np.float64).T, atol=1e-5)
  np.testing.assert_allclose(gw, np.einsum("btd,btv->dv", np.asarray(h, np.float64), dz),
                             atol=1e-4)


def test_position_kl_is_float32_from_bfloat16(hidden):
  h, w, rh, rw = (x.astype(jnp.bfloat16) for x in hidden)
  rev, fwd = logprobs.position_kl(h, w, rh, rw, chunk_size=4)
  assert rev.dtype == fwd.dtype == jnp.float32
  np_rev = _np_kl(*(np.asarray(x, np.float32) for x in (h, w, rh, rw)))[0]
  np.testing.assert_allclose(rev, np_rev, atol=1e-4)


@pytest.mark.parametrize("which", ["exact", "topk"])
def test_no_btv_buffer_in_forward_or_backward(which):
  b, t, d, v, chunk = 8, 256, 16, 4096, 64
  btv_bytes = b * t * v * 4
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  args = (jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (d, v)),
          jax.random.normal(k[2], (b, t, d)), jax.random.normal(k[3], (d, v)))

  def loss(h, w, rh, rw):
    if which == "exact":
      return jnp.sum(logprobs.position_kl(h, w, rh, rw, chunk_size=chunk)[0])
    return jnp.sum(full_kl.topk_position_kl(k[0], h, w, rh, rw, k=64, chunk_size=chunk))

  def naive(h, w, rh, rw):
    z = jnp.einsum("btd,dv->btv", h, w)
    rz = jnp.einsum("btd,dv->btv", rh, rw)
    return jnp.sum(jnp.exp(jax.nn.log_softmax(z)) * (jax.nn.log_softmax(z)
                                                     - jax.nn.log_softmax(rz)))

  temp = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile(
  ).memory_analysis().temp_size_in_bytes
  assert temp(naive) >= btv_bytes  # the measurement sees a [B, T, V] buffer when there is one
  assert temp(loss) < btv_bytes / 3


# ---- top-k + tail ----


def _enumerated_topk(logits, ref_logits, k, m):
  """E over the m i.i.d. tail draws, by enumerating every tuple of tail tokens with its probability
  r(v_1)…r(v_m), of the estimate and of its gradient w.r.t. the logits."""
  z = jnp.asarray(logits)[None]
  rz = jnp.asarray(ref_logits)[None]
  p = np.exp(logits - logits.max())
  p /= p.sum()
  top = np.argsort(-logits)[:k]
  r = p.copy()
  r[top] = 0.0
  r /= r.sum()
  tail_tokens = [v for v in range(len(logits)) if v not in top]
  value = np.zeros(())
  grad = np.zeros(len(logits))
  for combo in itertools.product(tail_tokens, repeat=m):
    weight = np.prod(r[list(combo)])
    tail = jnp.asarray([combo], jnp.int32)
    f = lambda x: full_kl.topk_tail_kl(x, rz, tail, k=k)[0]
    value = value + weight * float(f(z))
    grad = grad + weight * np.asarray(jax.grad(f)(z)[0])
  return value, grad


@pytest.mark.parametrize("k,m", [(1, 1), (3, 1), (3, 2), (6, 1)])
def test_topk_tail_is_unbiased_in_value_and_gradient(float64, k, m):
  rng = np.random.default_rng(k + 10 * m)
  logits, ref_logits = 1.5 * rng.normal(size=7), rng.normal(size=7)
  value, grad = _enumerated_topk(logits, ref_logits, k, m)
  p = np.exp(logits) / np.exp(logits).sum()
  q = np.exp(ref_logits) / np.exp(ref_logits).sum()
  kl = np.sum(p * np.log(p / q))
  np.testing.assert_allclose(value, kl, atol=1e-10)
  np.testing.assert_allclose(grad, p * (np.log(p / q) - kl), atol=1e-10)


def test_topk_tail_single_draw_differs_from_exact(float64):
  """The estimate is random: a single tail draw is not the exact KL (the test above is not vacuous)."""
  rng = np.random.default_rng(0)
  logits, ref_logits = rng.normal(size=7), rng.normal(size=7)
  top = np.argsort(-logits)[:2]
  v = [i for i in range(7) if i not in top][0]
  est = full_kl.topk_tail_kl(logits[None], ref_logits[None], jnp.asarray([[v]]), k=2)[0]
  p = np.exp(logits) / np.exp(logits).sum()
  q = np.exp(ref_logits) / np.exp(ref_logits).sum()
  assert abs(float(est) - np.sum(p * np.log(p / q))) > 1e-3


def test_sample_tail_draws_only_outside_the_top_k():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 20)), jnp.float32)
  tail = full_kl.sample_tail(jax.random.PRNGKey(0), logits, k=5, num_samples=200)
  assert tail.shape == (4, 200) and tail.dtype == jnp.int32
  top = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  for row in range(4):
    assert not np.isin(np.asarray(tail[row]), top[row]).any()


def test_topk_position_kl_with_a_one_token_tail_is_exact(hidden):
  """k = V − 1 leaves one tail token, drawn with certainty: the estimate is the exact KL."""
  h, w, rh, rw = hidden
  v = w.shape[1]
  got = full_kl.topk_position_kl(jax.random.PRNGKey(0), h, w, rh, rw, k=v - 1, chunk_size=3)
  exact_rev = logprobs.position_kl(h, w, rh, rw)[0]
  np.testing.assert_allclose(got, exact_rev, atol=1e-5)
  f = lambda fn: jax.grad(lambda h, w: jnp.sum(fn(h, w)), argnums=(0, 1))(h, w)
  g_top = f(lambda h, w: full_kl.topk_position_kl(jax.random.PRNGKey(0), h, w, rh, rw, k=v - 1,
                                                  chunk_size=3))
  g_exact = f(lambda h, w: logprobs.position_kl(h, w, rh, rw)[0])
  for a, b in zip(g_top, g_exact):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_topk_position_kl_averages_to_the_exact_kl(hidden):
  h, w, rh, rw = hidden
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draws = jax.vmap(lambda kk: full_kl.topk_position_kl(kk, h, w, rh, rw, k=8, chunk_size=4))(keys)
  exact_rev = np.asarray(logprobs.position_kl(h, w, rh, rw)[0])
  stderr = np.asarray(draws.std(0)) / np.sqrt(len(keys))
  assert np.all(np.abs(np.asarray(draws.mean(0)) - exact_rev) < 5 * stderr + 1e-6)
  assert np.all(stderr > 0)  # the tail is random


# ---- bad input ----


def test_bad_inputs_name_the_argument(hidden):
  h, w, rh, rw = hidden
  with pytest.raises(ValueError, match="ref_hidden_btd"):
    logprobs.position_kl(h, w, None, None)
  with pytest.raises(ValueError, match="hidden_btd"):
    logprobs.position_kl(h[0], w, rh[0], rw)
  with pytest.raises(ValueError, match="k must satisfy"):
    full_kl.topk_position_kl(jax.random.PRNGKey(0), h, w, rh, rw, k=w.shape[1])
  with pytest.raises(ValueError, match="tail_nm"):
    full_kl.topk_tail_kl(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.zeros((3, 1), jnp.int32), k=2)
  with pytest.raises(ValueError, match="num_samples"):
    full_kl.sample_tail(jax.random.PRNGKey(0), jnp.zeros((2, 5)), k=2, num_samples=0)
  with pytest.raises(ValueError, match="kl_bt"):
    full_kl.sequence_surrogate(jnp.float32(1.0), jnp.float32(0.0))
  with pytest.raises(ValueError, match="one shape"):
    full_kl.sequence_surrogate(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(TypeError, match="logp_bt"):
    full_kl.sequence_surrogate(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="forward direction"):
    full_kl.full_kl_term(direction="forward", credit="sequence")
  with pytest.raises(ValueError, match="credit"):
    full_kl.full_kl_term(credit="token")
  with pytest.raises(ValueError, match="PRNG"):
    full_kl.full_kl_term(top_k=4).position_kl(h, w, rh, rw)


# ---- sampled gradients on tabular sequences ----


def test_rb_and_k1_rtg_are_unbiased_and_rb_is_less_noisy():
  from kljax import tabular_rl
  from kljax.kl import kl_term

  k = jax.random.split(jax.random.PRNGKey(7), 2)
  ref = exact.random_tabular(k[0], vocab=3, length=4)
  policy = tuple(r + 0.7 * jax.random.normal(kk, r.shape)
                 for r, kk in zip(ref, jax.random.split(k[1], 4)))
  g = exact.rkl_grad(policy, ref)
  trials = 512
  out = {}
  for name in ("k1_in_reward_rtg", "exact_rkl_rb"):
    for n in (16, 64):
      out[name, n] = tabular_rl.gradient_spread(kl_term(name), policy, ref, g,
                                                jax.random.PRNGKey(n), num_samples=n,
                                                num_trials=trials)
  for (name, n), (spread, bias) in out.items():
    assert bias < 4 * spread / np.sqrt(trials), (name, n, spread, bias)  # MC level: unbiased
    # the spread of an N-sample mean falls as 1/√N: independent batches
  for name in ("k1_in_reward_rtg", "exact_rkl_rb"):
    assert 1.6 < out[name, 16][0] / out[name, 64][0] < 2.5
  assert out["exact_rkl_rb", 16][0] < 0.8 * out["k1_in_reward_rtg", 16][0]


def test_rb_on_one_token_has_no_sampling_noise():
  from kljax import tabular_rl
  from kljax.kl import kl_term

  policy, ref, _ = _policies(5, 1)
  spread, bias = tabular_rl.gradient_spread(kl_term("exact_rkl_rb"), policy, ref,
                                            exact.rkl_grad(policy, ref), jax.random.PRNGKey(0),
                                            num_samples=4, num_trials=16)
  assert spread < 1e-5 and bias < 1e-5
  spread_k1, _ = tabular_rl.gradient_spread(kl_term("k1_in_reward_rtg"), policy, ref,
                                            exact.rkl_grad(policy, ref), jax.random.PRNGKey(0),
                                            num_samples=4, num_trials=16)
  assert spread_k1 > 0.1


def test_kl_term_resolves_the_full_names():
  from kljax.kl import FULL_KL_NAMES, kl_term, kl_term_names

  for name in FULL_KL_NAMES + ("top8_rkl_as_loss", "top512_rkl_rb"):
    term = kl_term(name)
    assert isinstance(term, full_kl.FullKLTerm) and term.name == name
    assert name not in kl_term_names()  # the per-token grid stays per-token
  assert kl_term("top8_rkl_rb").top_k == 8 and kl_term("exact_rkl_rb").credit == "sequence"
  for bad in ("exact_fkl_rb", "top8_fkl_as_loss", "top0_rkl_rb", "exact_rkl_as_loss+ratio"):
    with pytest.raises(ValueError, match="unknown KL term"):
      kl_term(bad)


def test_audit_says_it_cannot_run_a_full_term():
  from kljax import audit

  with pytest.raises(audit.AuditError, match="whole next-token distribution"):
    audit.audit("exact_rkl_rb")


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("credit", ["position", "sequence"])
def test_topk_terms_follow_the_exact_terms_gradient_in_expectation(float64, credit, off_policy):
  """Sequence level: the expectation over every position's tail draw (enumerated: each tail token v
  with its probability r(v)) of the top-k term's expected gradient is the exact term's target."""
  pol, ref, old = _policies(4, 3, seed=2)
  old = old if off_policy else None
  term = full_kl.full_kl_term(credit=credit, top_k=2)
  v = 4

  def surrogate(logits, ref_logits, tokens, old_logp):
    n, t, _ = logits.shape
    flat, ref_flat = logits.reshape(n * t, v), ref_logits.reshape(n * t, v)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(flat), -1)
    top = jax.lax.top_k(flat, 2)[1]
    in_top = jnp.zeros(flat.shape, bool).at[jnp.arange(n * t)[:, None], top].set(True)
    r = jnp.where(in_top, 0.0, jnp.exp(log_p))
    r = r / jnp.sum(r, -1, keepdims=True)  # the tail law a draw follows
    kl = sum(r[:, u] * full_kl.topk_tail_kl(flat, ref_flat, jnp.full((n * t, 1), u), k=2)
             for u in range(v))  # E over the draw; a draw inside the top k has r = 0
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
    return term.surrogate(kl.reshape(n, t), logp, old_logp)

  got = exact.expected_gradient_full(surrogate, pol, ref, old=old)
  want = (exact.rkl_grad(pol, ref) if credit == "sequence"
          else exact.frozen_prefix_rkl_grad(pol, ref, prefixes=old))
  assert exact.tree_distance(got, want) < 1e-6
