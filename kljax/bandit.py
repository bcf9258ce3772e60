"""The bandit experiment: maximize E_π[r] − β·KL(π‖π_ref) for a categorical policy with each KL term.

With exact gradients every term converges to the stationary point of the objective it *really*
descends, which the closed forms of `kljax.exact` name: π* ∝ π_ref·exp(r/β) for the reverse KL, the
forward-KL optimum for k3 as loss, and the β = 0 optimum (argmax r) for terms with no regularization.
With sampled gradients (N actions a step) the same comparison includes the estimators' noise.

Off-policy mode (`inner_steps > 1`): N actions are drawn from π_old at the start of each group of
`inner_steps` optimizer steps and reused for all of them, as in PPO's inner epochs; the reward part
is importance-weighted and the KL term gets `old_logp`, so its correction (or lack of one) matters.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kljax import _checks
from kljax import exact
from kljax.advantages import leave_one_out
from kljax.estimators import kl_from_log_probs
from kljax.kl import KLTerm, kl_term
from kljax.progress import bar as tqdm  # log lines when not on a terminal

MODES = ("exact", "sampled")
METRICS = ("tv_star", "tv_fkl", "tv_zero", "reverse_kl", "forward_kl", "reward")


class Problem(NamedTuple):
  rewards: np.ndarray  # [K]
  ref_probs: np.ndarray  # [K]
  beta: float
  pi_star: np.ndarray  # argmax E r − β KL(π‖π_ref)
  pi_fkl: np.ndarray  # argmax E r − β KL(π_ref‖π)
  pi_zero: np.ndarray  # argmax E r


class Run(NamedTuple):
  term: str
  mode: str
  curves: dict[str, np.ndarray]  # metric -> [num_steps]
  final_probs: np.ndarray  # [K]


def make_problem(
    *, num_arms: int, beta: float, seed: int, reward_scale: float = 1.0, ref_temperature: float = 1.0
) -> Problem:
  """A random bandit: rewards ~ reward_scale·N(0, 1), π_ref = softmax(N(0, 1)/ref_temperature)."""
  if num_arms < 2:
    raise ValueError(f"num_arms must be >= 2, got {num_arms}.")
  beta = _checks.positive(beta, "beta")
  _checks.positive(ref_temperature, "ref_temperature")
  rng = np.random.default_rng(seed)
  rewards = reward_scale * rng.normal(size=num_arms)
  z = rng.normal(size=num_arms) / ref_temperature
  ref_probs = np.exp(z - z.max())
  ref_probs /= ref_probs.sum()
  return Problem(
      rewards=rewards,
      ref_probs=ref_probs,
      beta=beta,
      pi_star=exact.optimum_reverse(ref_probs, rewards, beta),
      pi_fkl=exact.optimum_forward(ref_probs, rewards, beta),
      pi_zero=exact.optimum_unregularized(rewards),
  )


def _metrics(problem: Problem, theta: jax.Array) -> dict[str, jax.Array]:
  p = jax.nn.softmax(theta)
  log_p, log_q = jax.nn.log_softmax(theta), jnp.log(jnp.asarray(problem.ref_probs, p.dtype))
  tv = lambda target: exact.total_variation(p, jnp.asarray(target, p.dtype))
  return {
      "tv_star": tv(problem.pi_star),
      "tv_fkl": tv(problem.pi_fkl),
      "tv_zero": tv(problem.pi_zero),
      "reverse_kl": kl_from_log_probs(log_p, log_q),
      "forward_kl": kl_from_log_probs(log_q, log_p),
      "reward": p @ jnp.asarray(problem.rewards, p.dtype),
  }


def check_mode(mode: str) -> str:
  """Raises ValueError unless `mode` is one of `MODES`."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
  return mode


def check_steps(num_steps: int, inner_steps: int) -> None:
  """Raises ValueError unless `num_steps` is a positive multiple of `inner_steps` ≥ 1."""
  if inner_steps < 1 or num_steps < 1 or num_steps % inner_steps:
    raise ValueError(
        f"num_steps ({num_steps}) must be a positive multiple of inner_steps ({inner_steps})."
    )


def _gradient_fn(problem: Problem, term: KLTerm, mode: str, num_samples: int):
  """(theta, old_theta, actions) -> gradient of −(E r − β·KL term), exact or from the actions."""
  return _GRADIENTS[mode](jnp.asarray(problem.rewards, jnp.float32),
                          jnp.log(jnp.asarray(problem.ref_probs, jnp.float32)), problem.beta,
                          term, num_samples)


# `_GRADIENTS[mode](rewards, ref_logp, beta, term, num_samples)`: `_gradient_fn` with the problem as
# (possibly traced) arrays, so a grid of problems vmaps.


def _exact_gradient(rewards, ref_logp, beta, term: KLTerm, num_samples: int):
  del num_samples

  def grad(theta, old_theta, actions):
    del actions
    reward_grad = jax.grad(lambda t: jax.nn.softmax(t) @ rewards)(theta)
    kl_grad = exact.expected_gradient(
        term, (theta,), (ref_logp,), old=(jax.lax.stop_gradient(old_theta),)
    )[0]
    return -reward_grad + beta * kl_grad

  return grad


def _sampled_gradient(rewards, ref_logp, beta, term: KLTerm, num_samples: int):
  del num_samples  # the actions' count

  def grad(theta, old_theta, actions):
    old_lp = jax.nn.log_softmax(old_theta)[actions]
    advantage = leave_one_out(rewards[actions])

    def loss(t):
      lp = jax.nn.log_softmax(t)[actions]
      # ρ = exp(lp − old_lp), unclamped: `estimators.importance_ratio` would give the same values,
      # but its gradient rounds differently under XLA, and the committed reproduction's sampled
      # bandit runs then drift (TV to π* moves by up to 4e-4 after 3000 steps).
      reward_part = jnp.mean(advantage * jnp.exp(lp - old_lp))
      return -reward_part + beta * jnp.mean(term.surrogate(lp, ref_logp[actions], old_lp))

    return jax.grad(loss)(theta)

  return grad


_GRADIENTS = {"exact": _exact_gradient, "sampled": _sampled_gradient}


def run(
    problem: Problem,
    term: KLTerm,
    *,
    mode: str,
    num_steps: int,
    learning_rate: float,
    num_samples: int = 64,
    inner_steps: int = 1,
    final_lr_fraction: float = 0.01,
    seed: int = 0,
) -> Run:
  """Trains softmax logits from θ = log π_ref with Adam; returns the per-step metric curves.

  The learning rate decays from `learning_rate` to `final_lr_fraction`·`learning_rate` on a cosine,
  so sampled runs settle near their stationary point instead of wandering at the noise floor.
  """
  check_mode(mode)
  check_steps(num_steps, inner_steps)
  if mode == "sampled" and num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 for the leave-one-out baseline, got {num_samples}.")
  _checks.positive(learning_rate, "learning_rate")
  grad_fn = _gradient_fn(problem, term, mode, num_samples)
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=final_lr_fraction))
  theta0 = jnp.log(jnp.asarray(problem.ref_probs, jnp.float32))

  def inner(carry, _):
    theta, opt_state, old_theta, actions = carry
    updates, opt_state = opt.update(grad_fn(theta, old_theta, actions), opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    return (theta, opt_state, old_theta, actions), _metrics(problem, theta)

  def group(carry, key):
    theta, opt_state = carry
    actions = jax.random.categorical(key, theta, shape=(num_samples,))
    (theta, opt_state, _, _), metrics = jax.lax.scan(
        inner, (theta, opt_state, theta, actions), length=inner_steps
    )
    return (theta, opt_state), metrics

  @jax.jit
  def train(key):
    keys = jax.random.split(key, num_steps // inner_steps)
    (theta, _), metrics = jax.lax.scan(group, (theta0, opt.init(theta0)), keys)
    return jax.nn.softmax(theta), jax.tree.map(lambda m: m.reshape(-1), metrics)

  probs, curves = train(jax.random.PRNGKey(seed))
  curves = {k: np.asarray(v) for k, v in curves.items()}
  if not all(np.all(np.isfinite(v)) for v in curves.values()):
    raise FloatingPointError(f"{term.name} ({mode}): a metric became non-finite during training.")
  return Run(term.name, mode, curves, np.asarray(probs, np.float64))


def run_all(
    problem: Problem,
    terms: Iterable[str],
    *,
    modes: Iterable[str] = MODES,
    progress: bool = True,
    **run_kwargs,
) -> list[Run]:
  """`run` for every (mode, term), with a progress bar."""
  jobs = [(mode, name) for mode in modes for name in terms]
  for mode, name in jobs:  # fail on a bad name or mode before any compilation
    kl_term(name)
    check_mode(mode)
  results = []
  bar = tqdm(jobs, desc="bandit", unit="run", disable=not progress)
  for mode, name in bar:
    bar.set_postfix_str(f"{mode} {name}")
    results.append(run(problem, kl_term(name), mode=mode, **run_kwargs))
  return results


def final_distances(run_: Run, problem: Problem) -> dict[str, float]:
  """TV distance of the final policy from the three optima."""
  return {
      "tv_star": exact.tv_distance(run_.final_probs, problem.pi_star),
      "tv_fkl": exact.tv_distance(run_.final_probs, problem.pi_fkl),
      "tv_zero": exact.tv_distance(run_.final_probs, problem.pi_zero),
  }


# ---------------------------------------------------------------- the regime map
# One rewarded arm (reward 1, the others 0) whose reference probability π_ref(best) is swept: small
# π_ref(best) is the regime where RL must move mass the reference barely covers (δ = π_ref/π → 0 on
# that arm). There k3's coefficient 1 − δ saturates at 1 while the reverse-KL coefficient
# log(π/π_ref) keeps growing, so k3 as loss (→ the forward-KL optimum) lets π move much further.

REGIME_METRICS = ("final_rkl", "final_fkl", "reward", "tv_star", "tv_fkl", "log_ratio_best")


def regime_ref_probs(pi_ref_best: float, num_arms: int) -> np.ndarray:
  """π_ref with π_ref(arm 0) = pi_ref_best and the rest spread evenly over the other arms."""
  if not 0.0 < pi_ref_best < 1.0:
    raise ValueError(f"pi_ref_best must be in (0, 1), got {pi_ref_best}.")
  q = np.full(num_arms, (1.0 - pi_ref_best) / (num_arms - 1))
  q[0] = pi_ref_best
  return q


def regime_map(
    term: KLTerm,
    *,
    mode: str,
    pi_ref_best: Iterable[float],
    betas: Iterable[float],
    num_arms: int = 10,
    num_steps: int = 3000,
    learning_rate: float = 0.1,
    num_samples: int = 64,
    final_lr_fraction: float = 0.01,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Trains `term` on every (π_ref(best), β) of the grid (reward 1 on arm 0, 0 elsewhere) and
  returns {metric: [len(pi_ref_best), len(betas)]} of the final policies (`REGIME_METRICS`):
  exact KL(π‖π_ref), KL(π_ref‖π), E[r], TV to π* and to the forward-KL optimum, and
  log(π(best)/π_ref(best)). One compilation per (term, mode): the grid is vmapped.
  """
  check_mode(mode)
  ps, bs = [float(p) for p in pi_ref_best], [float(b) for b in betas]
  for b in bs:
    _checks.positive(b, "beta")
  refs = np.stack([regime_ref_probs(p, num_arms) for p in ps])  # [P, K]
  rewards = np.zeros(num_arms)
  rewards[0] = 1.0
  grid_ref = jnp.asarray(np.repeat(np.log(refs), len(bs), axis=0), jnp.float32)  # [P·B, K]
  grid_beta = jnp.asarray(np.tile(bs, len(ps)), jnp.float32)
  r = jnp.asarray(rewards, jnp.float32)
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=final_lr_fraction))

  def one(ref_logp, beta, key):
    grad_fn = _GRADIENTS[mode](r, ref_logp, beta, term, num_samples)

    def body(carry, k):
      theta, opt_state = carry
      actions = jax.random.categorical(k, theta, shape=(num_samples,))
      updates, opt_state = opt.update(grad_fn(theta, theta, actions), opt_state, theta)
      return (optax.apply_updates(theta, updates), opt_state), None

    (theta, _), _ = jax.lax.scan(body, (ref_logp, opt.init(ref_logp)),
                                 jax.random.split(key, num_steps))
    return jax.nn.log_softmax(theta)

  keys = jax.random.split(jax.random.PRNGKey(seed), grid_ref.shape[0])
  log_p = np.asarray(jax.jit(jax.vmap(one))(grid_ref, grid_beta, keys), np.float64)
  if not np.all(np.isfinite(log_p)):
    raise FloatingPointError(f"{term.name} ({mode}): a final policy is non-finite.")
  out = {m: np.zeros((len(ps), len(bs))) for m in REGIME_METRICS}
  for i, q in enumerate(refs):
    for j, b in enumerate(bs):
      lp = log_p[i * len(bs) + j]
      p = np.exp(lp)
      out["final_rkl"][i, j] = kl_from_log_probs(lp, np.log(q))
      out["final_fkl"][i, j] = kl_from_log_probs(np.log(q), lp)
      out["reward"][i, j] = p @ rewards
      out["tv_star"][i, j] = exact.tv_distance(p, exact.optimum_reverse(q, rewards, b))
      out["tv_fkl"][i, j] = exact.tv_distance(p, exact.optimum_forward(q, rewards, b))
      out["log_ratio_best"][i, j] = lp[0] - np.log(q[0])
  return out
