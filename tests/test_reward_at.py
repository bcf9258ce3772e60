"""The trainer's `kl.reward_at`: which target an after-norm in-reward penalty follows when it is
computed at rollout (from π_old, held over the epochs) or at the current parameters, proved by
exact enumeration of tabular policies (`kljax.exact`) through the trainer's own pieces
(`grpo.penalized_advantages` inside `losses.ppo_clip_loss`), and that `make_loss_fn` wires the
mode in.

Derivations (δ-free, k1 in reward, y ~ π_old, PPO ratio ρ_t = π(y_t|y_<t)/π_old(y_t|y_<t) inside
the clip range, so the KL part of the loss is β·ρ_t·sg(c_t)):
  E_{y_t~π_old}[ρ_t c_t ∇logπ_t] = Σ_v π(v|y_<t) c_t(v) ∇logπ(v|y_<t)  (per position).
  current, c_t = log π − log π_ref: each position's ∇KL(π_t‖π_ref,t), prefixes drawn from π_old:
    frozen_prefix_rkl_grad(prefixes=π_old); one token: ∇RKL.
  rollout, c_t = log π_old − log π_ref = (log π − log π_ref) − (log π − log π_old): the same minus
    each position's ∇KL(π_t‖π_old,t): frozen-prefix ∇RKL(π‖π_ref) − frozen-prefix ∇RKL(π‖π_old),
    prefixes from π_old; one token: ∇RKL − ∇KL(π‖π_old).
  reward-to-go, c_t = Σ_{s≥t} k1_s: the later tokens are drawn from π_old and only ρ_t weighs the
    term, so neither mode is the sequence ∇RKL off-policy (the prefix/future law stays π_old's);
    on-policy (π_old = π) both modes give the sequence ∇RKL, token credit the frozen-prefix ∇RKL.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kljax import exact, kl_term, losses, models
from kljax.kl import KLTerm
from kljax.train import config as config_lib
from kljax.train import grpo, loss, objective

BETA = 0.5
EPS = 0.99  # a clip range wide enough that no token is clipped here (checked below)


def _policies(length, seed=0):
  kp, kq, ko = jax.random.split(jax.random.PRNGKey(seed), 3)
  vocab = 6 if length == 1 else 3
  policy = exact.random_tabular(kp, vocab=vocab, length=length, scale=0.5)
  ref = exact.random_tabular(kq, vocab=vocab, length=length, scale=0.5)
  noise = exact.random_tabular(ko, vocab=vocab, length=length, scale=0.15)
  return policy, ref, tuple(p + n for p, n in zip(policy, noise))


def _trainer_kl_part(name, reward_at):
  """The KL part of the trainer's per-token loss as a surrogate for `kljax.exact`: the PPO-clip
  loss of zero group advantages minus β·c_t, c_t computed as `reward_at` says."""
  term = kl_term(name)

  def surrogate(logp, ref_logp, old_logp=None, *, mask=None):
    old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp  # on-policy: ρ ≡ 1
    mask = jnp.ones(logp.shape, bool)
    ratio = jnp.exp(jax.lax.stop_gradient(logp) - old)
    assert bool(jnp.all((ratio > 1 - EPS) & (ratio < 1 + EPS)))  # no clipping
    adv = objective.penalized_advantages(term, jnp.zeros(logp.shape), BETA, logp, old, ref_logp, mask,
                                         reward_at=reward_at)
    pg = losses.ppo_clip_loss(logp, old, adv, mask, clip_eps_low=EPS, clip_eps_high=EPS,
                              dual_clip=None)
    return pg.loss_bt / BETA

  return KLTerm(f"{name}@{reward_at}", "loss", surrogate, term.coefficient, term.value)


def _grad(name, reward_at, policy, ref, old):
  return exact.expected_gradient(_trainer_kl_part(name, reward_at), policy, ref, old=old)


def _rel(a, b):
  a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _minus(a, b):
  return tuple(x - y for x, y in zip(a, b))


@pytest.mark.parametrize("seed", [0, 1])
def test_token_credit_off_policy_by_enumeration(seed):
  for length in (1, 3):
    policy, ref, old = _policies(length, seed)
    now = _grad("k1_in_reward", "current", policy, ref, old)
    held = _grad("k1_in_reward", "rollout", policy, ref, old)
    if length == 1:
      want_now = exact.rkl_grad(policy, ref)
      want_held = _minus(exact.rkl_grad(policy, ref), exact.rkl_grad(policy, old))
    else:
      want_now = exact.frozen_prefix_rkl_grad(policy, ref, prefixes=old)
      want_held = _minus(want_now, exact.frozen_prefix_rkl_grad(policy, old, prefixes=old))
    assert _rel(now, want_now) < 1e-5
    assert _rel(held, want_held) < 1e-5
    assert _rel(held, want_now) > 0.05  # the rollout penalty is visibly off the target


@pytest.mark.parametrize("reward_at", grpo.REWARD_AT)
def test_reward_to_go_off_policy_stays_biased_through_the_prefix_law(reward_at):
  policy, ref, old = _policies(3)
  g = _grad("k1_in_reward_rtg", reward_at, policy, ref, old)
  targets = {"∇RKL": exact.rkl_grad(policy, ref),
             "frozen, π_θ prefixes": exact.frozen_prefix_rkl_grad(policy, ref),
             "frozen, π_old prefixes": exact.frozen_prefix_rkl_grad(policy, ref, prefixes=old)}
  for label, t in targets.items():
    assert _rel(g, t) > 0.02, (reward_at, label)


@pytest.mark.parametrize("reward_at", grpo.REWARD_AT)
def test_on_policy_both_modes_are_the_same(reward_at):
  policy, ref, _ = _policies(3)
  assert _rel(_grad("k1_in_reward", reward_at, policy, ref, None),
              exact.frozen_prefix_rkl_grad(policy, ref)) < 1e-5
  assert _rel(_grad("k1_in_reward_rtg", reward_at, policy, ref, None),
              exact.rkl_grad(policy, ref)) < 1e-5


# ---- config validation ----


def _config(**kl):
  c = config_lib.grpo_tiny()
  c.kl.term = "k1_in_reward"
  for k, v in kl.items():
    c.kl[k] = v
  return c


def test_reward_at_config_errors_name_the_field():
  assert _config().kl.reward_at == "rollout"  # the default: today's behaviour
  grpo.validate(_config(reward_at="current"))
  with pytest.raises(grpo.ConfigError, match=r"--config.kl.reward_at: must be one of rollout, "
                                             r"current, got 'now'"):
    grpo.validate(_config(reward_at="now"))
  with pytest.raises(grpo.ConfigError, match="--config.kl.reward_at: 'current' .* reward_stage="
                                             "'before_norm'"):
    grpo.validate(_config(reward_at="current", reward_stage="before_norm"))


# ---- make_loss_fn wires the mode in ----


def test_make_loss_fn_recomputes_the_penalty_at_the_current_parameters():
  # With reward_at="current" the loss of a batch whose advantages carry no penalty has the gradient
  # of the rollout-mode loss whose host advantages were penalized at the *current* parameters'
  # log-probs, and not that of the rollout penalty (old_logp ≠ logp).
  vocab, prompt_len, new = 11, 3, 4
  model = models.create(models.preset("tiny", vocab_size=vocab), seed=0)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  b = 4
  tokens = jnp.asarray(rng.integers(1, vocab, (b, prompt_len + new)), jnp.int32)
  attn = jnp.ones(tokens.shape, bool)
  mask = jnp.ones((b, new), bool)
  stats = loss.completion_stats(graphdef, params, params, tokens, attn, prompt_len=prompt_len,
                                chunk_size=64, with_ref=True, exact_kl=False)
  logp = stats["logp"]
  ref_logp = logp + jnp.asarray(rng.normal(0, 0.5, logp.shape), jnp.float32)  # π_ref ≠ π
  old = logp + jnp.asarray(rng.normal(0, 0.1, logp.shape), jnp.float32)  # π_old ≠ π
  adv = jnp.asarray(np.repeat(rng.normal(size=(b, 1)), new, 1), jnp.float32)
  term = kl_term("k1_in_reward")
  kw = dict(graphdef=graphdef, prompt_len=prompt_len, clip_eps_low=EPS, clip_eps_high=EPS,
            dual_clip=None, aggregation="token-mean", chunk_size=64, exact_kl=False,
            on_policy=False, with_ref=True)

  def grad(reward_at, advantages):
    kl = objective.of(term, on_policy=False, reward_at=reward_at)
    fn = loss.make_loss_fn(kl, **kw)
    batch = {"tokens": tokens, "attn_mask": attn, "mask": mask, "advantages": advantages,
             "old_logp": old, "ref_logp": ref_logp}
    g = jax.grad(lambda p: fn(p, params, BETA, batch)[0])(params)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])

  at_current = grad("current", adv)
  host_current = grad("rollout", objective.kl_in_advantages(term, adv, BETA, logp, ref_logp, mask))
  host_rollout = grad("rollout", objective.kl_in_advantages(term, adv, BETA, old, ref_logp, mask))
  np.testing.assert_allclose(at_current, host_current, rtol=1e-4, atol=1e-7)
  assert np.linalg.norm(at_current - host_rollout) > 1e-3 * np.linalg.norm(at_current)
