"""GRPO building blocks against NumPy: group advantages, PPO-clip loss, aggregation, rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import advantages, losses, rewards, sharding


@pytest.fixture
def rewards_pg(rng):
  r = rng.integers(0, 3, (6, 4)).astype(np.float32) / 2
  r[1] = 1.0  # a zero-variance group
  return r


def test_group_advantages_match_numpy(rewards_pg):
  r = rewards_pg.astype(np.float64)
  mean = r.mean(1, keepdims=True)
  std = r.std(1, ddof=1, keepdims=True)
  g = r.shape[1]
  expected = {
      "grpo": (r - mean) / np.maximum(std, 1e-6),
      "dr_grpo": r - mean,
      "rloo": r - (r.sum(1, keepdims=True) - r) / (g - 1),
      "reinforce_pp_baseline": (r - mean) / (r - mean).std(ddof=1),
  }
  zero_var = np.mean([len(set(row)) == 1 for row in r])
  for name, want in expected.items():
    out = advantages.group_advantages(name)(rewards_pg)
    np.testing.assert_allclose(out.advantages_pg, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(out.zero_variance_fraction) == pytest.approx(zero_var)
  np.testing.assert_allclose(expected["rloo"], g / (g - 1) * (r - mean))  # the identity in the doc


def test_reinforce_pp_is_device_count_invariant(rewards_pg):
  want = advantages.reinforce_pp_baseline_advantages(rewards_pg).advantages_pg
  mesh = sharding.make_mesh(data=-1, devices=jax.devices()[:2])  # 6 groups over 2 devices
  placed = jax.device_put(rewards_pg, sharding.batch_sharding(mesh))
  got = jax.jit(lambda r: advantages.reinforce_pp_baseline_advantages(r).advantages_pg)(placed)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_advantage_errors():
  with pytest.raises(ValueError, match=r"rewards_pg must be \[num_prompts, group_size\] with group_size >= 2"):
    advantages.grpo_advantages(np.zeros((4, 1)))
  with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; choose one of grpo"):
    advantages.group_advantages("ppo")


def _np_ppo(logp, old, adv, lo, hi, dual):
  rho = np.exp(logp.astype(np.float64) - old)
  un, cl = -adv * rho, -adv * np.clip(rho, 1 - lo, 1 + hi)
  loss = np.maximum(un, cl)
  grad = np.where(cl > un, 0.0, -adv * rho)  # d loss / d logp on the active branch
  if dual is not None:
    capped = (adv < 0) & (loss > -adv * dual)
    loss = np.where(capped, -adv * dual, loss)
    grad = np.where(capped, 0.0, grad)
  return loss, grad


@pytest.mark.parametrize("lo,hi,dual", [(0.2, 0.2, None), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)])
def test_ppo_clip_loss_matches_numpy(rng, lo, hi, dual):
  logp = rng.normal(-1.0, 0.3, (4, 9)).astype(np.float32)
  old = (logp + rng.normal(0.0, 0.6, logp.shape)).astype(np.float32)
  adv = rng.normal(size=(4, 9)).astype(np.float32)
  mask = rng.random((4, 9)) > 0.2
  out = losses.ppo_clip_loss(logp, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi,
                             dual_clip=dual)
  want, grad = _np_ppo(logp, old, adv, lo, hi, dual)
  np.testing.assert_allclose(out.loss_bt, np.where(mask, want, 0), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda lp: jnp.sum(losses.ppo_clip_loss(lp, old, adv, mask, clip_eps_low=lo,
                                                       clip_eps_high=hi, dual_clip=dual).loss_bt))(
      jnp.asarray(logp))
  np.testing.assert_allclose(g, np.where(mask, grad, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.clipped_bt, mask & (grad == 0) & (np.abs(adv) > 0))
  np.testing.assert_allclose(out.ppo_kl_bt, np.where(mask, old - logp, 0), atol=1e-6)


def _np_aggregate(x, m, mode, tokens=None, seqs=None, length=None):
  x, m = x.astype(np.float64), m.astype(np.float64)
  s = x.shape[0] if seqs is None else seqs
  if mode == "token-mean":
    return (x * m).sum() / (m.sum() if tokens is None else tokens)
  if mode == "seq-mean-token-mean":
    return ((x * m).sum(1) / m.sum(1)).sum() / s
  if mode == "seq-mean-token-sum":
    return (x * m).sum() / s
  return (x * m).sum() / (s * (x.shape[1] if length is None else length))


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_aggregation_modes_and_minibatch_sums(rng, mode):
  x = rng.normal(size=(8, 6)).astype(np.float32)
  m = rng.random((8, 6)) > 0.3
  m[:, 0] = True
  assert float(losses.aggregate(x, m, mode)) == pytest.approx(_np_aggregate(x, m, mode), rel=1e-5)
  # With the global denominators, minibatch losses add up to the full-batch loss
  # (for every mode but the per-sequence token mean this is exact; that one too, per sequence).
  whole = float(losses.aggregate(x, m, mode))
  parts = sum(float(losses.aggregate(x[i:i + 2], m[i:i + 2], mode, num_tokens=m.sum(),
                                     num_sequences=8)) for i in range(0, 8, 2))
  assert parts == pytest.approx(whole, rel=1e-5)


def test_aggregation_is_device_count_invariant(rng):
  x = rng.normal(size=(8, 6)).astype(np.float32)
  m = rng.random((8, 6)) > 0.3
  mesh = sharding.make_mesh(data=8)
  placed = jax.device_put((x, m), sharding.batch_sharding(mesh))
  for mode in losses.AGGREGATIONS:
    got = jax.jit(lambda a, b: losses.aggregate(a, b, mode))(*placed)
    assert float(got) == pytest.approx(float(losses.aggregate(x, m, mode)), rel=1e-6)


def test_loss_errors():
  z = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="unknown aggregation 'mean'; choose one of token-mean"):
    losses.aggregate(z, z > 0, "mean")
  with pytest.raises(ValueError, match=r"dual_clip must be > 1 \(or None to disable\), got 0.5"):
    losses.ppo_clip_loss(z, z, z, z > 0, dual_clip=0.5)
  with pytest.raises(ValueError, match=r"clip_eps_high must lie in the open interval \(0, 1\)"):
    losses.ppo_clip_loss(z, z, z, z > 0, clip_eps_high=1.2)
  with pytest.raises(ValueError, match=r"old_logp_bt\[2, 4\]"):
    losses.ppo_clip_loss(z, np.zeros((2, 4)), z, z > 0)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so 3 + 4 = 7.\n#### 7", "7"),
        ("#### 1,234", "1,234"),
        ("The answer is \\boxed{\\frac{3}{4}} indeed", "\\frac{3}{4}"),
        ("thus \\boxed{12} and later 99", "12"),
        ("I think 5 apples then 42", "42"),
        ("no digits here", None),
        ("#### -3.5 then 8", "-3.5"),
    ],
)
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


def test_numeric_match_and_format():
  completions = ["... #### 1,234", "\\boxed{\\frac{3}{4}}", "it is 0.75", "#### 8", "nothing"]
  answers = ["1234", "0.75", "3/4", "7", "1"]
  assert rewards.numeric_match([""] * 5, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]
  assert rewards.format_reward([""] * 5, completions) == [1.0, 0.0, 0.0, 1.0, 0.0]


def _flaky(prompts, completions, **_):
  return [1.0 / (len(c) - 3) for c in completions]  # divides by zero on 3-character completions


def test_score_weights_errors_and_counting():
  prompts, completions = ["p1", "p2", "p3"], ["#### 4", "abc", "#### 5"]
  s = rewards.score([rewards.numeric_match, rewards.format_reward], prompts, completions,
                    weights=[1.0, 0.1], answer=["4", "4", "6"])
  np.testing.assert_allclose(s.total, [1.1, 0.0, 0.1])
  assert s.failures == 0
  with pytest.raises(rewards.RewardError,
                     match=r"_flaky raised ZeroDivisionError: .* on sample 1 \(prompt 'p2', "
                           r"completion 'abc'\).*on_error='zero'"):
    rewards.score([_flaky], prompts, completions)
  s = rewards.score([_flaky], prompts, completions, on_error="zero")
  np.testing.assert_allclose(s.total, [1 / 3, 0.0, 1 / 3], rtol=1e-6)
  assert s.failures == 1
  with pytest.raises(rewards.RewardError, match="returned 1 values"):
    rewards.score([lambda p, c, **_: [1.0]], prompts, completions)


def test_load_reward_fn():
  assert rewards.load_reward_fn("numeric_match") is rewards.numeric_match
  assert rewards.load_reward_fn("kljax.rewards:format_reward") is rewards.format_reward
  with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod': No module named"):
    rewards.load_reward_fn("no_such_pkg.mod:fn")
  with pytest.raises(ValueError, match="has no callable 'nope'"):
    rewards.load_reward_fn("kljax.rewards:nope")
  with pytest.raises(ValueError, match="expected a built-in name"):
    rewards.load_reward_fn("exact")


def test_leave_one_out_baseline_matches_a_loop(rng):
  # The one leave-one-out baseline (RLOO, the bandit, the tabular study): r_i − mean of the others.
  from kljax.advantages import leave_one_out

  r = rng.normal(size=(3, 5))
  loop = np.array([[r[p, i] - np.mean(np.delete(r[p], i)) for i in range(5)] for p in range(3)])
  np.testing.assert_allclose(leave_one_out(r), loop, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(leave_one_out(r.T, axis=0), loop.T, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="rewards needs >= 2 entries along axis -1"):
    leave_one_out(np.ones((4, 1)))


def test_value_clamped_tokens_metric_counts_what_the_clamp_touches():
  # verl's low_var_kl clamps k3 = δ − 1 − log δ (δ = π_ref/π) to [−10, 10]: count by hand in NumPy.
  from kljax.kl import kl_term
  from kljax.train import objective, step_metrics

  rng = np.random.default_rng(0)
  lp = rng.normal(-2.0, 1.0, (4, 6)).astype(np.float32)
  ref = lp + rng.choice([-15.0, -1.0, 0.5, 3.0, 14.0], size=lp.shape).astype(np.float32)
  mask = rng.random(lp.shape) > 0.3
  log_delta = ref.astype(np.float64) - lp
  k3 = np.exp(log_delta) - 1.0 - log_delta
  expected = int(((np.abs(k3) > 10.0) & mask).sum())
  assert expected > 0
  m = mask.astype(np.float32)
  tmean = lambda x: float((np.asarray(x) * m).sum() / m.sum())
  stats = {"logp": lp, "ref_logp": ref}
  kl = lambda name: objective.of(kl_term(name), on_policy=True)  # noqa: E731
  out = step_metrics._reference_metrics(stats, mask, tmean, kl("k3_as_loss+value_clamp"))
  assert out["kl_value_clamped_tokens"] == expected
  assert "kl_value_clamped_tokens" not in step_metrics._reference_metrics(stats, mask, tmean,
                                                                          kl("k3_as_loss"))


@pytest.mark.parametrize("num_steps", [1, 2])
def test_the_optimizer_schedule_for_one_or_two_updates(num_steps):
  """One update runs at the peak rate (a warm-up from 0 would make it a no-op; optax's cosine
  decay refuses zero decay steps); with two, the first is the warm-up's 0. Adam's first step is
  lr·g/|g| (bias-corrected moments), plus AdamW's decoupled decay lr·wd·p."""
  from kljax.train import config as config_lib
  from kljax.train.grpo import make_optimizer
  from kljax.train.options import Options

  c = config_lib.grpo_tiny()
  c.num_steps = num_steps
  c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip = 0.1, 0.01, 1e9
  opt = make_optimizer(Options.of(c))
  p, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  update, _ = opt.update(g, opt.init(p), p)
  lr = 0.1 if num_steps == 1 else 0.0
  np.testing.assert_allclose(update, -lr * (np.sign(g) + 0.01 * np.asarray(p)), rtol=1e-5,
                             atol=1e-7)
