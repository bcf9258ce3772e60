"""The KL coefficient β: constant, an optax schedule, or an adaptive target-KL controller.

Each is an optax-style factory returning a `BetaController` NamedTuple of pure functions
`init() -> BetaState` and `update(state, observed_kl, *, n_steps=1) -> BetaState`; the β to use at a
step is `state.beta`. States are pytrees of arrays, so they jit, checkpoint and shard like optax states.

References:
  D. M. Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593
  (2019), §2.2 (adaptive KL controller).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from kljax import _checks


class BetaState(NamedTuple):
  beta: jax.Array  # float32 scalar: the coefficient to use now
  count: jax.Array  # int32 scalar: number of updates so far


class BetaController(NamedTuple):
  init: Callable[[], BetaState]
  update: Callable[..., BetaState]


def constant_beta(beta: float) -> BetaController:
  """β fixed at `beta` (≥ 0)."""
  beta = _checks.positive(beta, "beta", allow_zero=True)
  return scheduled_beta(optax.constant_schedule(beta))


def scheduled_beta(schedule: optax.Schedule) -> BetaController:
  """β = schedule(number of updates), e.g. `optax.linear_schedule(0.0, 0.1, 1000)`.

  The schedule's value at step 0 is checked to be a finite number ≥ 0 when the controller is built.
  """
  if not callable(schedule):
    raise TypeError(f"schedule must be a callable step -> β (an optax schedule), got {schedule!r}.")
  _checks.positive(float(schedule(0)), "beta (the schedule's value at step 0)", allow_zero=True)

  def init():
    return BetaState(jnp.asarray(schedule(0), jnp.float32), jnp.zeros((), jnp.int32))

  def update(state, observed_kl=None, *, n_steps=1):
    del observed_kl  # a schedule ignores the measured KL
    count = state.count + n_steps
    return BetaState(jnp.asarray(schedule(count), jnp.float32), count)

  return BetaController(init, update)


def adaptive_beta(
    init_beta: float, *, target_kl: float, horizon: float, max_error: float = 0.2
) -> BetaController:
  """Ziegler et al. proportional controller toward a target KL.

  e = clip(KL_observed / KL_target − 1, −max_error, max_error);  β ← β · (1 + e · n_steps / horizon)

  Args:
    init_beta: starting β (> 0: a multiplicative controller cannot leave 0).
    target_kl: the KL to hold (> 0), in the units of the KL you pass to `update`.
    horizon: the number of samples over which β may change by a factor ~(1 ± max_error) (> 0).
    max_error: clip of the proportional error, in (0, 1).
  """
  init_beta = _checks.positive(init_beta, "init_beta")
  target_kl = _checks.positive(target_kl, "target_kl")
  horizon = _checks.positive(horizon, "horizon")
  max_error = _checks.open_unit(max_error, "max_error")

  def init():
    return BetaState(jnp.asarray(init_beta, jnp.float32), jnp.zeros((), jnp.int32))

  def update(state, observed_kl: ArrayLike, *, n_steps=1):
    kl = jnp.asarray(observed_kl, jnp.float32)
    if kl.shape != ():
      raise ValueError(f"observed_kl must be a scalar, got shape {list(kl.shape)}.")
    error = jnp.clip(kl / target_kl - 1.0, -max_error, max_error)
    beta = state.beta * (1.0 + error * n_steps / horizon)
    return BetaState(beta.astype(jnp.float32), state.count + n_steps)

  return BetaController(init, update)


def beta_controller(spec: float | optax.Schedule | BetaController) -> BetaController:
  """Accepts a number (constant β), an optax schedule, or a ready `BetaController`."""
  if isinstance(spec, BetaController):
    return spec
  if callable(spec):
    return scheduled_beta(spec)
  if isinstance(spec, (int, float)) and not isinstance(spec, bool):
    return constant_beta(spec)
  raise TypeError(
      f"beta must be a number, an optax schedule or a BetaController, got {type(spec).__name__}."
  )


def _adaptive(*, beta, target_kl, horizon, warmup_steps):
  del warmup_steps
  # A multiplicative controller cannot leave 0: start it just above.
  return adaptive_beta(max(beta, 1e-8), target_kl=target_kl, horizon=horizon)


def _linear_warmup(*, beta, target_kl, horizon, warmup_steps):
  del target_kl, horizon
  return scheduled_beta(optax.linear_schedule(0.0, beta, max(warmup_steps, 1)))


def _constant(*, beta, target_kl, horizon, warmup_steps):
  del target_kl, horizon, warmup_steps
  return constant_beta(beta)


CONTROLLERS = {"constant": _constant, "linear_warmup": _linear_warmup, "adaptive": _adaptive}
"""Controller name (a config's `kl.controller`) -> factory(*, beta, target_kl, horizon,
warmup_steps) -> `BetaController`: β constant; 0 → β linearly over `warmup_steps` updates; or
Ziegler et al.'s adaptive controller from β toward `target_kl`."""


def controller(name: str, *, beta: float, target_kl: float = 0.05, horizon: float = 10_000.0,
               warmup_steps: int = 0) -> BetaController:
  """The β controller called `name` (the config boundary); ValueError lists the valid names."""
  if name not in CONTROLLERS:
    raise ValueError(f"controller must be one of {', '.join(map(repr, CONTROLLERS))}, got {name!r}.")
  return CONTROLLERS[name](beta=beta, target_kl=target_kl, horizon=horizon,
                           warmup_steps=warmup_steps)

