"""Sampler → trainer corrections (kljax.offpolicy): NumPy closed forms, exact enumeration, GRPO."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import exact, kl_term, offpolicy


def _batch(seed=0, b=16, t=6, scale=1.0):
  rng = np.random.default_rng(seed)
  old = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
  mu = (old + scale * rng.normal(size=(b, t))).astype(np.float32)
  mask = np.ones((b, t), bool)
  for i, n in enumerate(rng.integers(1, t + 1, b)):
    mask[i, n:] = False
  old[~mask], mu[~mask] = -np.inf, -np.inf  # padding: must not reach the maths
  return old, mu, mask


def _numpy_weights(name, cap, old, mu, mask):
  """The closed forms of the module docstring, in float64."""
  with np.errstate(invalid="ignore"):  # −inf − (−inf) at padding, masked out
    r = np.exp(np.where(mask, old.astype(np.float64) - mu, 0.0))
  seq = np.prod(np.where(mask, r, 1.0), axis=1, keepdims=True) * np.ones_like(r)
  if name == "none":
    w, changed = np.ones_like(r), np.zeros(r.shape, bool)
  elif name == "tis_token":
    w, changed = np.minimum(r, cap), r > cap
  elif name == "tis_sequence":
    w, changed = np.minimum(seq, cap), seq > cap
  elif name == "mis_token":
    keep = (r >= 1 / cap) & (r <= cap)
    w, changed = np.where(keep, r, 0.0), ~keep
  else:
    keep = (seq >= 1 / cap) & (seq <= cap)
    w, changed = np.where(keep, seq, 0.0), ~keep
  w = np.where(mask, w, 0.0)
  frac = changed[:, 0].mean() if name.endswith("sequence") else changed[mask].mean()
  return w, frac


@pytest.mark.parametrize("name", list(offpolicy.CORRECTIONS))
@pytest.mark.parametrize("cap", [1.5, 3.0])
def test_correction_matches_closed_form_off_policy(name, cap):
  old, mu, mask = _batch()
  fn = jax.jit(offpolicy.sampler_correction(name, cap=cap))
  out = fn(old, mu, mask)
  w, frac = _numpy_weights(name, cap, old, mu, mask)
  np.testing.assert_allclose(np.asarray(out.weights_bt), w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(out.corrected_fraction), frac, atol=1e-6)
  if name != "none":  # the batch is off-policy enough that each correction acts somewhere
    assert 0 < frac < 1


@pytest.mark.parametrize("name", list(offpolicy.CORRECTIONS))
def test_correction_is_identity_on_policy(name):
  old, _, mask = _batch()
  out = offpolicy.sampler_correction(name, cap=2.0)(old, old, mask)
  np.testing.assert_array_equal(np.asarray(out.weights_bt), mask.astype(np.float32))
  assert float(out.corrected_fraction) == 0.0


def test_sequence_weights_do_not_overflow():
  old = np.zeros((2, 40), np.float32)
  mu = np.full((2, 40), -5.0, np.float32)  # R = e^200, beyond float32
  mu[1] = 5.0  # R = e^-200
  tis = offpolicy.truncated_is(old, mu, cap=4.0, level="sequence")
  np.testing.assert_allclose(np.asarray(tis.weights_bt)[0], 4.0)
  assert np.all(np.isfinite(np.asarray(tis.weights_bt)))
  mis = offpolicy.masked_is(old, mu, cap=4.0, level="sequence")
  np.testing.assert_array_equal(np.asarray(mis.weights_bt), 0.0)
  assert float(mis.corrected_fraction) == 1.0
  seq = offpolicy.sampler_log_ratio(old, mu).sum(1)
  assert 0.0 < float(offpolicy.effective_sample_size(seq)) <= 1.0


def test_weights_carry_no_gradient():
  old, mu, mask = _batch()
  f = lambda o: jnp.sum(offpolicy.truncated_is(o, mu, mask, cap=2.0).weights_bt)
  np.testing.assert_array_equal(np.asarray(jax.grad(f)(jnp.where(mask, old, 0.0))), 0.0)


def test_ess_is_one_exactly_on_policy():
  old, _, mask = _batch()
  d = offpolicy.diagnostics(old, old, mask, offpolicy.no_correction(old, old, mask))
  assert float(d["sampler_ess"]) == 1.0
  assert float(d["sampler_ess_seq"]) == 1.0
  assert float(offpolicy.effective_sample_size(jnp.full((7,), 3.25))) == 1.0


def test_ess_matches_kish_formula():
  old, mu, mask = _batch(seed=3)
  with np.errstate(invalid="ignore"):
    log_r = np.where(mask, old.astype(np.float64) - mu, 0.0)
  r = np.exp(log_r)[mask]
  want = r.sum() ** 2 / (r.size * (r ** 2).sum())
  d = offpolicy.diagnostics(old, mu, mask, offpolicy.no_correction(old, mu, mask))
  np.testing.assert_allclose(float(d["sampler_ess"]), want, rtol=1e-5)
  seq = np.exp(log_r.sum(1))
  np.testing.assert_allclose(float(d["sampler_ess_seq"]),
                             seq.sum() ** 2 / (seq.size * (seq ** 2).sum()), rtol=1e-5)
  assert 0 < want < 1


@pytest.mark.parametrize("cap", [1.0, 0.5, -2.0, float("nan")])
def test_bad_cap_names_it(cap):
  with pytest.raises(ValueError, match="cap must be a number > 1"):
    offpolicy.sampler_correction("tis_token", cap=cap)
  with pytest.raises(ValueError, match="cap"):
    offpolicy.prefix_rtg_coefficient(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), cap=cap)


def test_unknown_correction_lists_the_names():
  with pytest.raises(ValueError, match="unknown sampler correction 'tis'.*tis_token.*mis_sequence"):
    offpolicy.sampler_correction("tis", cap=2.0)


def test_shape_mismatch_is_named():
  with pytest.raises(ValueError, match="old_logp.*sampler_logp"):
    offpolicy.truncated_is(np.zeros((2, 3)), np.zeros((2, 4)), cap=2.0)


# ---- the prefix-aware sequence ∇RKL ----


def test_prefix_coefficient_matches_numpy_loop():
  rng = np.random.default_rng(1)
  lp, mu, ref = (np.log(rng.uniform(0.1, 1, (3, 4))) for _ in range(3))
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  cap = 1.7
  want = np.zeros_like(lp)
  for b in range(3):
    for t in range(4):
      if not mask[b, t]:
        continue
      for s in range(t, 4):
        if mask[b, s]:
          w = min(np.exp(np.sum(lp[b, :s + 1] - mu[b, :s + 1])), cap)
          want[b, t] += w * (lp[b, s] - ref[b, s])
  got = offpolicy.prefix_rtg_coefficient(lp, mu, ref, mask, cap=cap)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def _tabular(seed, vocab=3, length=3, shift=0.8):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  policy = exact.random_tabular(k[0], vocab=vocab, length=length)
  ref = exact.random_tabular(k[1], vocab=vocab, length=length)
  noise = exact.random_tabular(k[2], vocab=vocab, length=length, scale=shift)
  sampler = tuple(p + n for p, n in zip(policy, noise))
  return policy, ref, sampler


def test_prefix_aware_is_exact_off_policy_and_the_per_token_ratio_is_not():
  policy, ref, sampler = _tabular(0)
  want = exact.rkl_grad(policy, ref)
  scale = exact.tree_norm(want)
  on = exact.expected_gradient(offpolicy.prefix_rtg_term(), policy, ref)
  assert exact.tree_distance(on, want) < 1e-6 * max(scale, 1)
  off = exact.expected_gradient(offpolicy.prefix_rtg_term(), policy, ref, old=sampler)
  assert exact.tree_distance(off, want) < 2e-6 * max(scale, 1)
  per_token = exact.expected_gradient(kl_term("k1_in_reward_rtg"), policy, ref, old=sampler)
  assert exact.tree_distance(per_token, want) > 1e-2 * scale
  capped = exact.expected_gradient(offpolicy.prefix_rtg_term(cap=1.2), policy, ref, old=sampler)
  assert exact.tree_distance(capped, want) > 1e-3 * scale  # truncation biases


def test_prefix_term_coefficient_is_its_on_policy_gradient():
  rng = np.random.default_rng(2)
  lp, ref = (jnp.asarray(np.log(rng.uniform(0.1, 1, (2, 5))), jnp.float32) for _ in range(2))
  term = offpolicy.prefix_rtg_term(cap=math.inf)
  g = jax.grad(lambda x: jnp.sum(term.surrogate(x, ref)))(lp)
  np.testing.assert_allclose(np.asarray(g), np.asarray(term.coefficient(lp, ref)), rtol=1e-6)


# ---- the trainer: config errors, a smoke run, the lag and its checkpoint ----

TIMING = {"time_rollout", "time_logprobs", "time_update", "tokens_per_second"}


def _tiny(data_dir, **changes):
  from test_grpo import tiny_config

  return tiny_config(data_dir, **changes)


@pytest.mark.parametrize("changes,match", [
    ({"rollout.staleness": -1}, r"--config.rollout.staleness: must be an integer >= 0.*got -1"),
    ({"rollout.dtype": "float16"}, r"--config.rollout.dtype: must be one of float32, bfloat16, "
                                   r"got 'float16'"),
    ({"rollout.correction": "tis"}, r"--config.rollout.correction: must be one of none, "
                                    r"tis_token, tis_sequence, mis_token, mis_sequence"),
    ({"rollout.correction_cap": 1.0}, r"--config.rollout.correction_cap: must be a number > 1"),
    ({"rollout.correct_kl": False, "kl.term": "k1_in_reward"},
     r"--config.rollout.correct_kl: False applies to loss-placed KL terms only"),
])
def test_bad_rollout_configs_name_the_field(data_dir, changes, match):
  from kljax.train import grpo

  with pytest.raises(grpo.ConfigError, match=match):
    grpo.validate(_tiny(data_dir, **changes))


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    {"rollout.correction": "tis_token"},
    {"rollout.correction": "mis_sequence", "rollout.correction_cap": 4.0, "loss.epochs": 2,
     "loss.minibatches": 2, "kl.term": "k3_as_loss+ratio"},
])
def test_grpo_stale_bfloat16_rollouts_with_a_correction(data_dir, tmp_path, changes):
  from kljax.train import grpo
  from kljax.train.metrics import read_jsonl

  config = _tiny(data_dir, **{"rollout.staleness": 2, "rollout.dtype": "bfloat16", **changes})
  grpo.train(config, str(tmp_path), progress=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1]
  for r in rows:
    assert all(np.isfinite(v) for v in r.values())
    assert 0.0 < r["sampler_ess"] <= 1.0 and 0.0 < r["sampler_ess_seq"] <= 1.0
    assert 0.0 <= r["sampler_corrected_fraction"] <= 1.0
    assert r["sampler_weight_mean"] >= 0.0
  # bfloat16 sampling: μ differs from the float32 π_old by more than float32 rounding
  assert rows[0]["sampler_logprob_gap"] > 1e-4


@pytest.mark.slow
def test_staleness_samples_with_old_parameters_and_resumes_exactly(data_dir, sft_dir, tmp_path):
  """k = 2: steps 0–3 sample with θ_0 (θ_1 = θ_0: the learning rate warms up from 0), step 4 with
  θ_2, so a run whose parameters never move draws the same batches for steps 0–3 only. A run
  stopped after step 2 and resumed continues bit-identically (the ring is in the checkpoint)."""
  from kljax import models
  from kljax.train import grpo
  from kljax.train.metrics import read_jsonl

  init = models.from_hf(sft_dir)
  # a large learning rate, so that θ_2 samples other tokens than θ_0 with the same key, held
  # constant after one warm-up step, so that a run of 3 steps follows the schedule of one of 5
  cfg = lambda **ch: _tiny(data_dir, **{"rollout.staleness": 2, "num_steps": 5,
                                        "optim.learning_rate": 0.02, "optim.warmup_steps": 1,
                                        "optim.final_lr_fraction": 1.0, **ch})
  grpo.train(cfg(), str(tmp_path / "stale"), init_model=init, progress=False)
  grpo.train(cfg(**{"optim.learning_rate": 0.0, "rollout.staleness": 0}), str(tmp_path / "frozen"),
             init_model=init, progress=False)
  grpo.train(cfg(num_steps=3), str(tmp_path / "resumed"), init_model=init, progress=False)
  grpo.train(cfg(), str(tmp_path / "resumed"), init_model=init, progress=False)
  stale, frozen, resumed = (read_jsonl(str(tmp_path / d / "metrics.jsonl"))
                            for d in ("stale", "frozen", "resumed"))
  hashes = lambda rows: [r["tokens_hash"] for r in rows]
  assert hashes(stale)[:4] == hashes(frozen)[:4]
  assert hashes(stale)[4] != hashes(frozen)[4]
  assert [r["step"] for r in resumed] == list(range(5))
  for a, b in zip(stale, resumed):
    for k in a:
      if k not in TIMING:
        assert b[k] == a[k], (a["step"], k)
