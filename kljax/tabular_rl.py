"""RL on enumerable autoregressive tabular policies: sampled gradients, exact metrics.

The sequence study of the reproduction: a tabular policy over V^T sequences (`kljax.exact`) is
trained as a GRPO trainer would train a model — N sequences sampled a step, a leave-one-out
baseline, the per-token KL term's surrogate with β, Adam after global-norm gradient clipping —
while the sequence KLs KL(P_θ‖P_ref), KL(P_ref‖P_θ) are computed exactly at every step.

The reward is 1 on one target sequence y* (chosen of low reference probability) and 0 elsewhere:
RL must move mass to a sequence the reference rarely produces, the regime where k3's coefficient
1 − δ saturates while log(π/π_ref) keeps growing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kljax import exact, full_kl
from kljax.advantages import leave_one_out
from kljax.kl import KLTerm

METRICS = ("rkl", "fkl", "target_prob", "reward", "grad_norm", "max_abs_log_delta")


class Trajectories(NamedTuple):
  curves: dict[str, np.ndarray]  # metric -> [seeds, steps]
  snapshots: tuple[np.ndarray, ...]  # the policy's tables every `snapshot_every` steps, seed 0


def rare_target(ref: exact.Policy, prob: float) -> int:
  """The index (in `exact.sequences` order) of the sequence whose P_ref is nearest `prob` in log."""
  lp = np.asarray(jnp.sum(exact.token_logprobs(ref), axis=-1), np.float64)
  return int(np.argmin(np.abs(lp - np.log(prob))))


def train(term: KLTerm, ref: exact.Policy, target: int, *, beta: float, num_steps: int,
          seeds: int, num_samples: int = 64, learning_rate: float = 0.05, grad_clip: float = 1.0,
          snapshot_every: int = 25) -> Trajectories:
  """Trains from θ = π_ref on reward 1[y = y*] − β·(term), `seeds` runs vmapped.

  Per step and seed: exact sequence RKL and FKL, P_θ(y*), the sampled batch's mean reward, the
  global norm of the (unclipped) gradient, and max |log δ| over the sampled tokens.
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 for the leave-one-out baseline, got {num_samples}.")
  if snapshot_every < 1 or num_steps % snapshot_every:
    raise ValueError(f"num_steps ({num_steps}) must be a multiple of snapshot_every "
                     f"({snapshot_every}).")
  ref = tuple(jnp.asarray(t, jnp.float32) for t in ref)
  ref_lp = exact.token_logprobs(ref)  # [N, T]
  opt = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate))

  def step(carry, key):
    theta, opt_state = carry
    lp_all = exact.token_logprobs(theta)
    idx = jax.random.categorical(key, jax.lax.stop_gradient(jnp.sum(lp_all, -1)),
                                 shape=(num_samples,))
    r = (idx == target).astype(jnp.float32)
    adv = leave_one_out(r)

    def loss(t):
      lp = exact.token_logprobs(t)[idx]
      pg = -jnp.mean(adv * jnp.sum(lp, -1))
      kl = jnp.mean(jnp.sum(term.surrogate(lp, ref_lp[idx], jax.lax.stop_gradient(lp)), -1))
      return pg + beta * kl

    grads = jax.grad(loss)(theta)
    updates, opt_state = opt.update(grads, opt_state, theta)
    new = optax.apply_updates(theta, updates)
    m = {"rkl": exact.reverse_kl(theta, ref), "fkl": exact.forward_kl(theta, ref),
         "target_prob": jnp.exp(jnp.sum(lp_all[target])), "reward": jnp.mean(r),
         "grad_norm": optax.tree.norm(grads),
         "max_abs_log_delta": jnp.max(jnp.abs(lp_all[idx] - ref_lp[idx]))}
    return (new, opt_state), (m, theta)

  @jax.jit
  def run(keys):
    def one(key):
      (_, _), (m, thetas) = jax.lax.scan(step, (ref, opt.init(ref)),
                                         jax.random.split(key, num_steps))
      return m, thetas
    m, thetas = jax.vmap(one)(keys)
    snaps = tuple(t[0, ::snapshot_every] for t in thetas)  # seed 0
    return m, snaps

  m, snaps = run(jax.random.split(jax.random.PRNGKey(0), seeds))
  curves = {k: np.asarray(v, np.float64) for k, v in m.items()}
  if not all(np.all(np.isfinite(v)) for v in curves.values()):
    raise FloatingPointError(f"{term.name}: a metric became non-finite.")
  return Trajectories(curves, tuple(np.asarray(s) for s in snaps))


def kl_gradient_noise(term: KLTerm, policies, ref: exact.Policy, key: jax.Array, *,
                      num_samples: int, num_trials: int = 256) -> np.ndarray:
  """std/‖E g‖ of the KL term's N-sequence sampled gradient at each policy of `policies`: the
  spread of one batch's gradient (√E‖ĝ − E ĝ‖², over `num_trials` batches) over the norm of the
  exact expected gradient (`exact.expected_gradient`). `policies`: tables with a leading axis [S].
  """
  ref = tuple(jnp.asarray(t, jnp.float32) for t in ref)
  ref_lp = exact.token_logprobs(ref)
  flat = lambda g: jnp.concatenate([x.reshape(-1) for x in g])

  @jax.jit
  def one(policy, k):
    def sampled(kk):
      idx = jax.random.categorical(kk, jnp.sum(exact.token_logprobs(policy), -1),
                                   shape=(num_samples,))

      def loss(t):
        lp = exact.token_logprobs(t)[idx]
        return jnp.mean(jnp.sum(term.surrogate(lp, ref_lp[idx], jax.lax.stop_gradient(lp)), -1))

      return flat(jax.grad(loss)(policy))

    grads = jax.vmap(sampled)(jax.random.split(k, num_trials))
    g = flat(exact.expected_gradient(term, policy, ref))
    spread = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grads - grads.mean(0)), -1)))
    return spread / jnp.maximum(jnp.linalg.norm(g), 1e-30)

  policies = tuple(jnp.asarray(t, jnp.float32) for t in policies)
  n = policies[0].shape[0]
  keys = jax.random.split(key, n)
  return np.asarray([float(one(tuple(t[i] for t in policies), keys[i])) for i in range(n)])


def batch_loss_of(term):
  """`(θ, ref, idx [N]) -> mean over the sampled sequences of Σ_t surrogate`, on-policy, for a
  per-token `KLTerm` or a `kljax.full_kl.FullKLTerm` (top-k terms excepted: they draw their own
  tail). θ and ref are tabular policies of one (V, T); idx indexes `exact.sequences(V, T)`."""
  if isinstance(term, full_kl.FullKLTerm):
    if term.top_k is not None:
      raise ValueError(f"{term.name}: top-k terms sample their tail; give an exact term.")

    def loss(theta, ref, idx):
      seqs = exact.sequences(*exact.shape_of(theta))
      s = full_kl.logits_surrogate(term, exact.conditional_logits(theta)[idx],
                                   exact.conditional_logits(ref)[idx], seqs[idx])
      return jnp.mean(jnp.sum(s, -1))
  else:
    def loss(theta, ref, idx):
      lp = exact.token_logprobs(theta)[idx]
      ref_lp = exact.token_logprobs(ref)[idx]
      return jnp.mean(jnp.sum(term.surrogate(lp, ref_lp, jax.lax.stop_gradient(lp)), -1))
  return loss


@functools.lru_cache(maxsize=64)
def _trials(term, num_samples: int, num_trials: int):
  """The jitted N-sequence sampled gradients of `term`, one compilation per table shape."""
  loss = batch_loss_of(term)
  flat = lambda g: jnp.concatenate([x.reshape(-1) for x in g])

  @jax.jit
  def trials(theta, ref, key):  # tables as arguments, not constants: nothing to constant-fold
    logits = jnp.sum(exact.token_logprobs(theta), -1)

    def one(k):
      idx = jax.random.categorical(k, logits, shape=(num_samples,))
      return flat(jax.grad(loss)(theta, ref, idx))
    return jax.vmap(one)(jax.random.split(key, num_trials))
  return trials


def gradient_spread(term, policy: exact.Policy, ref: exact.Policy, expected: exact.Policy,
                    key: jax.Array, *, num_samples: int, num_trials: int = 512
                    ) -> tuple[float, float]:
  """(std/‖E g‖, bias/‖E g‖) of the N-sequence sampled gradient of `term` on-policy: the spread
  √E‖ĝ − mean ĝ‖² and ‖mean ĝ − E g‖ over `num_trials` batches, relative to the exact gradient
  `expected` it estimates (e.g. `exact.rkl_grad`). `term`: see `batch_loss_of`."""
  if num_samples < 1 or num_trials < 2:
    raise ValueError(f"need num_samples >= 1 and num_trials >= 2, got {num_samples}, "
                     f"{num_trials}.")
  as32 = lambda p: tuple(jnp.asarray(t, jnp.float32) for t in p)
  grads = np.asarray(_trials(term, int(num_samples), int(num_trials))(as32(policy), as32(ref), key),
                     np.float64)
  g = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in expected])
  mean = grads.mean(0)
  norm = max(np.linalg.norm(g), 1e-30)
  spread = np.sqrt(np.mean(np.sum((grads - mean) ** 2, -1)))
  return float(spread / norm), float(np.linalg.norm(mean - g) / norm)
