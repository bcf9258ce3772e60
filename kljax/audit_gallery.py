"""The gallery: what other RL frameworks' KL terms compute, re-derived from their source as JAX.

Each function below is a small pure JAX re-statement of one framework's KL code path, written from
reading that framework's source (facts carry over; no code was copied). A comment above each
function names the file, function and version read. `GALLERY` pairs every function with the way the
framework uses it (as a loss, or subtracted from the reward with a given credit) and with a
hand-derived verdict for `kljax.audit`:

  the on-policy gradient of a one-token term is E[c·∇logp] with
    "as loss"                 c = ∂k/∂logp
    "in reward"               c = k                         (the framework uses sg(k))
    "× live ratio ρ"          c = ∂k/∂logp + k      (ρ = exp(logp − sg(old)) ≡ 1, ∇ρ = ∇logp)
  and  c = log π − log π_ref (+ const) → "reverse",   c = 1 − δ (+ const) → "forward",
       c ≡ const → "zero",   anything else → "biased"     (δ = π_ref/π = exp(ref_logp − logp)).

Signatures follow `kljax.audit`:
  elementwise  fn(logp, ref_logp) -> per-element value, any shape
  sequence     fn(logp_bt, ref_logp_bt, old_logp_bt, mask_bt) -> per-token loss [B, T]
Inputs are float32 log-probabilities of the sampled tokens. `ref_logp` and `old_logp` are data:
every function stops their gradient itself, as the frameworks do by computing them under no_grad.

Versions read. Released packages (December 2026: the wheel from the package registry, unzipped;
"PyPI X" below) where the framework publishes one, else a repository snapshot ("vX+N" = N commits
after tag vX):
  verl       0.9.1 (PyPI wheel verl-0.9.1-py3-none-any.whl); before: v0.7.0+125, commit b178a3c
  TRL        1.16.0 (PyPI wheel trl-1.16.0-py3-none-any.whl); before: v1.9.0+26, commit f2cd577
  OpenRLHF   0.11.2 (PyPI wheel openrlhf-0.11.2-cp311); before: v0.11.0, commit 3c3be62
  NeMo-RL    v0.1.0+1338, commit 7ea279a (2026-08-22): PyPI's nemo-rl is a 0.0.0 placeholder, and
             the newest repository snapshot reachable here is still this commit
  tunix      0.1.7 (PyPI wheel google_tunix-0.1.7, the latest on PyPI), and v0.1.7+326 (pyproject
             0.1.8), commit c7d8950 (2026-08-21)
  MaxText    0.2.5 (PyPI wheel maxtext-0.2.5-py3-none-any.whl, requires google-tunix>=0.1.7);
             before: maxtext-v0.2.4+10, commit e591f30
  slime      v0.3.1+38, commit 624b824 (2026-08-21)
  ROLL       v0.3.0+9, commit 8eb27cc (2026-08-19)
  SkyRL      0.4.0 (PyPI wheel skyrl-0.4.0-py3-none-any.whl); before: skyrl_train-v0.4.0+516,
             commit a956457
  AReaL      v1.0.4+17, commit 4aef98d (2026-05-21)
docs/frameworks_sources.md holds the notes behind each entry.

References:
  J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), Table 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kljax import audit

_sg = jax.lax.stop_gradient

_VERL = "verl 0.9.1 (PyPI)"
_TRL = "TRL 1.16.0 (PyPI)"
_OPENRLHF = "OpenRLHF 0.11.2 (PyPI)"
_OPENRLHF_PR1309 = "OpenRLHF 0.11.2 (PyPI; PR #1309)"
_NEMO = "NeMo-RL v0.1.0+1338 (commit 7ea279a, 2026-08-22)"
_TUNIX = "tunix 0.1.7 (PyPI; and v0.1.7+326, commit c7d8950)"
_MAXTEXT = "MaxText 0.2.5 (PyPI; tunix >= 0.1.7)"
_SLIME = "slime v0.3.1+38 (commit 624b824, 2026-08-21)"
_ROLL = "ROLL v0.3.0+9 (commit 8eb27cc, 2026-08-19)"
_SKYRL = "SkyRL 0.4.0 (PyPI)"
_AREAL = "AReaL v1.0.4+17 (commit 4aef98d, 2026-05-21)"


class Entry(NamedTuple):
  """One framework configuration, its JAX re-derivation and the verdict expected from the audit."""

  framework: str  # "verl"
  option: str  # the config as users write it
  computes: str  # short maths
  impl: "audit.Implementation"  # built with audit.elementwise(...) or audit.sequence(...)
  expected: str  # hand-derived on-policy one-token verdict: reverse | forward | zero | biased
  reason: str  # the on-policy gradient coefficient, in one line
  source: str  # framework version, file path and function read
  numerics: str  # clamps and other numerics worth knowing; "" if nothing notable


# --------------------------------------------------------------------------------------------------
# Shared pieces. `lr = logp − ref_logp = k1`, `log δ = −lr`.


def _log_ratio(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  return jnp.asarray(logp, jnp.float32) - _sg(jnp.asarray(ref_logp, jnp.float32))


def _keep(mask: ArrayLike) -> jax.Array:
  """The valid-token mask as bool (the audit passes 0/1 floats)."""
  return jnp.asarray(mask) > 0


def _masked_log_weight(logp, old_logp, mask):
  """log ρ_t = logp_t − sg(old_logp_t), 0 at padded positions (a −inf there cannot make a NaN)."""
  logp = jnp.asarray(logp, jnp.float32)
  return jnp.where(_keep(mask), logp - _sg(jnp.asarray(old_logp, jnp.float32)), 0.0)


def _straight_through(value: jax.Array, grad_surrogate: jax.Array) -> jax.Array:
  """Forward value `value`, gradient that of `grad_surrogate`: sg(value) + g − sg(g)."""
  return _sg(value) + grad_surrogate - _sg(grad_surrogate)


# --------------------------------------------------------------------------------------------------
# verl — verl/trainer/ppo/core_algos.py `kl_penalty`, `kl_penalty_forward`; callers
# verl/workers/actor/dp_actor.py (use_kl_loss) and verl/trainer/ppo/ray_trainer.py
# `apply_kl_penalty` (use_kl_in_reward, from `old_log_probs`: the penalty is computed once, at
# rollout). Read in the 0.9.1 wheel (before: v0.7.0+125, commit b178a3c).


def verl_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """verl `kl` / `k1`: k1 = logp − ref_logp."""
  return _log_ratio(logp, ref_logp)


def verl_abs(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """verl `abs`: |logp − ref_logp|."""
  return jnp.abs(_log_ratio(logp, ref_logp))


def verl_mse(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """verl `mse` / `k2`: k2 = ½(logp − ref_logp)²."""
  return 0.5 * jnp.square(_log_ratio(logp, ref_logp))


def verl_low_var_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """verl `low_var_kl` / `k3`: x = clip(ref_logp − logp, −20, 20); clip(eˣ − x − 1, −10, 10).

  Both clamps act on values, so each zeroes the gradient past it: the value clamp at k3 = 10 is
  reached at log δ ≈ 2.61 (π_ref ≈ 13.6 π) and at log δ ≈ −11.
  """
  x = jnp.clip(-_log_ratio(logp, ref_logp), -20.0, 20.0)
  return jnp.clip(jnp.exp(x) - x - 1.0, -10.0, 10.0)


def verl_low_var_kl_plus(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """verl `low_var_kl+`: value k3 (as `low_var_kl`), gradient of k2 (straight-through).

  sg(k3_clamped) + k2 − sg(k2). Shipped since 0.9.1's `kl_penalty` strips the '+' before
  `kl_penalty_forward` (v0.7.0+125 passed it unstripped and raised NotImplementedError).
  """
  k2 = 0.5 * jnp.square(_log_ratio(logp, ref_logp))
  return _straight_through(verl_low_var_kl(logp, ref_logp), k2)


def verl_kl_plus(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """verl `kl+` / `k1+`: value k1, gradient of k2: sg(k1) + k2 − sg(k2)."""
  k2 = 0.5 * jnp.square(_log_ratio(logp, ref_logp))
  return _straight_through(verl_kl(logp, ref_logp), k2)


# --------------------------------------------------------------------------------------------------
# TRL — trl/trainer/grpo_trainer.py `GRPOTrainer._compute_loss` (per_token_kl, coef_1) and
# trl/trainer/grpo_config.py (beta=0.0, use_bias_correction_kl=True, importance_sampling_level).
# Read in the 1.16.0 wheel: the KL maths is that of v1.9.0+26 (commit f2cd577) with the bias
# correction on by default; the vLLM importance weight (vllm_importance_sampling_correction)
# multiplies the policy-gradient loss before β·KL is added, so the KL never sees the sampler μ;
# trl/experimental/async_grpo/async_grpo_trainer.py has no reference KL.


def trl_k3(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """TRL per-token KL: k3 = δ − log δ − 1 with log δ = ref_logp − logp; no clamp."""
  log_delta = -_log_ratio(logp, ref_logp)
  return jnp.exp(log_delta) - log_delta - 1.0


def trl_k3_token_ratio(logp, ref_logp, old_logp, mask):
  """TRL `use_bias_correction_kl=True`, token level: ρ_t·k3_t, ρ_t = exp(logp_t − sg old_t) live.

  Shapes: all [B, T]; returns [B, T] (0 at padded positions).
  """
  rho = jnp.exp(_masked_log_weight(logp, old_logp, mask))
  return jnp.where(_keep(mask), rho * trl_k3(logp, ref_logp), 0.0)


def trl_k3_sequence_ratio(logp, ref_logp, old_logp, mask):
  """TRL `use_bias_correction_kl=True` with `importance_sampling_level="sequence"`: s·k3_t.

  s = exp(Σ_t m_t(logp_t − old_t) / max(Σ_t m_t, 1)), the live per-sequence geometric-mean ratio
  ([B, 1]), broadcast over the per-token k3 ([B, T]). For T > 1 the gradient gains
  (Σ_t k3_t)·∇ mean_t logp_t (TRL issue #6586, still open at 1.16.0).
  """
  m = _keep(mask).astype(jnp.float32)
  log_s = jnp.sum(_masked_log_weight(logp, old_logp, mask), -1, keepdims=True)
  log_s = log_s / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)
  return jnp.where(_keep(mask), jnp.exp(log_s) * trl_k3(logp, ref_logp), 0.0)


def trl_k3_sequence_ratio_sum(logp, ref_logp, old_logp, mask):
  """The sum reading of a sequence-level weight (TRL #5814; NeMo-RL #2269): W·k3_t with
  W = exp(Σ_t m_t(logp_t − old_t)) live, the whole-sequence ratio P_θ(y)/P_old(y), not its
  geometric mean. E_old[∇(W·Σ_t k3_t)] = ∇_θ E_θ[Σ_t k3_t]: the sequence ∇RKL, on- and off-policy.
  Not shipped by TRL 1.16.0 (it takes the mean); the row shows what the proposal would follow.
  """
  log_w = jnp.sum(_masked_log_weight(logp, old_logp, mask), -1, keepdims=True)
  return jnp.where(_keep(mask), jnp.exp(log_w) * trl_k3(logp, ref_logp), 0.0)


# --------------------------------------------------------------------------------------------------
# OpenRLHF — openrlhf/models/utils.py `compute_approx_kl`, `compute_reward`;
# openrlhf/trainer/ppo_utils/experience_maker.py (group_norm, then KL per token, then reward-to-go);
# openrlhf/trainer/ray/ppo_actor.py (--algo.kl.use_loss). Read in the 0.11.2 wheel (before: v0.11.0,
# commit 3c3be62): it ships the opt-in --algo.kl.unbiased_gradient (PR #1309) and clamps k3's
# log-ratio at −10 before the exp (PR #1335). The in-reward KL is computed in the experience maker
# from the rollout log-probs (`action_log_probs`): at rollout.


def openrlhf_k1(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """OpenRLHF `k1`: clip(logp − ref_logp, −10, 10) (value clamp)."""
  return jnp.clip(_log_ratio(logp, ref_logp), -10.0, 10.0)


def openrlhf_k2(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """OpenRLHF `k2`: clip(½(logp − ref_logp)², −10, 10); the value clamp acts past |k1| ≈ 4.47."""
  return jnp.clip(0.5 * jnp.square(_log_ratio(logp, ref_logp)), -10.0, 10.0)


def openrlhf_k3(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """OpenRLHF `k3`: x = max(lr, −10); clip(e^(−x) − 1 + x, −10, 10), lr = logp − ref_logp.

  The log-ratio clamp before the exp (0.11.2, PR #1335) acts only where the value clamp already
  has (k3 > 10 from log δ ≈ 2.61 on), so it removes the overflow, not a gradient.
  """
  lr = jnp.maximum(_log_ratio(logp, ref_logp), -10.0)
  return jnp.clip(jnp.exp(-lr) - 1.0 + lr, -10.0, 10.0)


def openrlhf_k3_unbiased_gradient(logp, ref_logp, old_logp, mask):
  """OpenRLHF `--algo.kl.unbiased_gradient` (PR #1309, in 0.11.2) with k3: value k3, gradient
  w·k1·∇logp.

  sg(k3_clamped) + w·k2 − sg(w·k2), w = sg(min(exp(logp − old_logp), 10)) (detached, clamped above).
  Shapes [B, T] → [B, T].
  """
  w = _sg(jnp.minimum(jnp.exp(_masked_log_weight(logp, old_logp, mask)), 10.0))
  grad_surrogate = w * 0.5 * jnp.square(_log_ratio(logp, ref_logp))
  return jnp.where(_keep(mask), _straight_through(openrlhf_k3(logp, ref_logp), grad_surrogate), 0.0)


# --------------------------------------------------------------------------------------------------
# NeMo-RL — nemo_rl/algorithms/utils.py `calculate_kl`; nemo_rl/algorithms/loss/loss_functions.py
# `ClippedPGLossConfig` (reference_policy_kl_penalty=0.01, reference_policy_kl_type="k3",
# kl_input_clamp_value=20, kl_output_clamp_value=10) and `ClippedPGLossFn.__call__` (the weight
# exp(logp − sg logp), PR #2506; weight detached at the input clamp, PR #2958);
# nemo_rl/algorithms/advantage_estimator.py (use_kl_in_reward). Read at v0.1.0+1338, commit 7ea279a.


def _nemo_kl(logp, ref_logp, estimator: str, weight=None):
  """NeMo-RL `calculate_kl`: log r = clip(ref_logp − logp, ±20); k(log r); × weight; clip(±10).

  The weight is detached wherever the input clamp is active; the output clamp acts on the weighted
  value (zero gradient past ±10).
  """
  log_r = -_log_ratio(logp, ref_logp)
  log_r_clamped = jnp.clip(log_r, -20.0, 20.0)
  if estimator == "k1":
    kl = -log_r_clamped
  elif estimator == "k2":
    kl = 0.5 * jnp.square(log_r_clamped)
  else:
    kl = jnp.exp(log_r_clamped) - 1.0 - log_r_clamped
  if weight is not None:
    weight = jnp.where(log_r == log_r_clamped, weight, _sg(weight))
    kl = weight * kl
  return jnp.clip(kl, -10.0, 10.0)


def _nemo_self_weight(logp):
  """exp(logp − sg(logp)): value 1, gradient ∇logp; non-finite values set to 0 as in NeMo-RL."""
  logp = jnp.asarray(logp, jnp.float32)
  w = jnp.exp(logp - _sg(logp))
  return jnp.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)


def nemo_k3(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """NeMo-RL default: exp(logp − sg logp)·k3, input clamp ±20, output clamp ±10."""
  return _nemo_kl(logp, ref_logp, "k3", _nemo_self_weight(logp))


def nemo_k1(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """NeMo-RL `reference_policy_kl_type=k1`: exp(logp − sg logp)·k1, clamps as `nemo_k3`."""
  return _nemo_kl(logp, ref_logp, "k1", _nemo_self_weight(logp))


def nemo_k2(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """NeMo-RL `reference_policy_kl_type=k2`: exp(logp − sg logp)·k2, clamps as `nemo_k3`."""
  return _nemo_kl(logp, ref_logp, "k2", _nemo_self_weight(logp))


def nemo_k3_on_policy_approx(logp, ref_logp, old_logp, mask):
  """NeMo-RL `use_on_policy_kl_approximation=True`: exp(logp − gen_logp)·k3, gen_logp = old_logp.

  The ratio to the generation policy is live (not detached) except where the input clamp is active.
  Shapes [B, T] → [B, T].
  """
  w = jnp.exp(_masked_log_weight(logp, old_logp, mask))
  w = jnp.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
  return jnp.where(_keep(mask), _nemo_kl(logp, ref_logp, "k3", w), 0.0)


def nemo_k3_unweighted(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """NeMo-RL in-reward KL (`use_kl_in_reward`): `calculate_kl` k3 with default clamps, no weight."""
  return _nemo_kl(logp, ref_logp, "k3")


# --------------------------------------------------------------------------------------------------
# tunix — tunix/rl/common.py `compute_kl_divergence`; tunix/rl/algo_core.py (β·KL added to the
# loss); tunix/rl/grpo/grpo_learner.py `GrpoConfig` (beta=0.04, kl_loss_mode="kl");
# tunix/rl/ppo/ppo_learner.py (KL in reward, kl_method="low_var_kl", from old_per_token_logps: at
# rollout). Read in the 0.1.7 wheel (the latest on PyPI) and at v0.1.7+326, c7d8950: the same KL
# maths. tunix/rl/agentic/agentic_rl_learner.py `use_rollout_logps=True` by default: π_old is the
# rollout engine's μ, and `sampler_is` weights only the policy-gradient loss.
# `kl_clamp_value` (default None) would clip the value after the exp.


def tunix_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """tunix `kl`: logp − ref_logp."""
  return _log_ratio(logp, ref_logp)


def tunix_mse_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """tunix `mse_kl`: ½(logp − ref_logp)²."""
  return 0.5 * jnp.square(_log_ratio(logp, ref_logp))


def tunix_low_var_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """tunix `low_var_kl`: e^d − d − 1, d = ref_logp − logp; no clamp by default."""
  d = -_log_ratio(logp, ref_logp)
  return jnp.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------------
# slime — slime/utils/ppo_utils.py `compute_approx_kl`, `get_grpo_returns`;
# slime/backends/megatron_utils/loss.py (--use-kl-loss, --use-unbiased-kl, --kl-coef);
# slime/utils/arguments.py (defaults). Read at v0.3.1+38, commit 624b824 (2026-08-21).


def _slime_estimate(logp, ref_logp, kl_loss_type: str) -> jax.Array:
  lr = _log_ratio(logp, ref_logp)
  if kl_loss_type == "k1":
    return lr
  if kl_loss_type == "k2":
    return 0.5 * jnp.square(lr)
  return jnp.exp(-lr) - 1.0 + lr  # "k3" and "low_var_kl"


def _slime_clamp(kl: jax.Array, kl_loss_type: str) -> jax.Array:
  # slime clamps only `low_var_kl` (after the ratio), never `k3`, though both compute the same k3.
  return jnp.clip(kl, -10.0, 10.0) if kl_loss_type == "low_var_kl" else kl


def slime_k1(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """slime `--kl-loss-type k1` (default): logp − ref_logp."""
  return _slime_estimate(logp, ref_logp, "k1")


def slime_k2(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """slime `k2`: ½(logp − ref_logp)²."""
  return _slime_estimate(logp, ref_logp, "k2")


def slime_low_var_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """slime `low_var_kl`: clip(e^(−lr) − 1 + lr, −10, 10), lr = logp − ref_logp."""
  return _slime_clamp(_slime_estimate(logp, ref_logp, "low_var_kl"), "low_var_kl")


def _slime_unbiased(kl_loss_type: str):
  def fn(logp, ref_logp, old_logp, mask):
    rho = jnp.exp(_masked_log_weight(logp, old_logp, mask))
    kl = _slime_clamp(rho * _slime_estimate(logp, ref_logp, kl_loss_type), kl_loss_type)
    return jnp.where(_keep(mask), kl, 0.0)

  fn.__name__ = f"slime_unbiased_{kl_loss_type}"
  fn.__doc__ = (
      f"slime `--use-unbiased-kl --kl-loss-type {kl_loss_type}`: ρ·k, ρ = exp(logp − sg old_logp)"
      " live; the ±10 clamp (low_var_kl only) acts on ρ·k. Shapes [B, T] → [B, T]."
  )
  return fn


slime_unbiased_low_var_kl = _slime_unbiased("low_var_kl")
slime_unbiased_k1 = _slime_unbiased("k1")
slime_unbiased_k2 = _slime_unbiased("k2")


def slime_grpo_kl_coef(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """slime `--kl-coef > 0` with `--advantage-estimator grpo|gspo|cispo`: 0.

  `get_grpo_returns` broadcasts the scalar reward and ignores the per-token KL, so the in-reward
  penalty never reaches the advantage.
  """
  return jnp.zeros_like(_log_ratio(logp, ref_logp))


# --------------------------------------------------------------------------------------------------
# ROLL — roll/utils/functionals.py `compute_approx_kl`, `compute_token_reward`,
# `reward_postprocess`, `compute_reinforce_return`; roll/pipeline/base_worker.py and
# roll/pipeline/rlvr/actor_worker.py (KL loss hard-coded to "k3"); roll/configs/base_config.py
# (defaults). Read at v0.3.0+9, commit 8eb27cc (2026-08-19).


def roll_k3(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """ROLL KL loss `k3`: x = ref_logp − logp; clip(eˣ − x − 1, −10, 10); no input clamp."""
  x = -_log_ratio(logp, ref_logp)
  return jnp.clip(jnp.exp(x) - x - 1.0, -10.0, 10.0)


def roll_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """ROLL `kl_penalty="kl"` (in reward): logp − ref_logp."""
  return _log_ratio(logp, ref_logp)


def roll_full(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """ROLL `kl_penalty="full"`, per element: π·(logp − ref_logp) = exp(logp)·k1.

  ROLL applies `F.kl_div(ref_logp, logp, log_target=True)` to the *gathered* per-token log-probs
  ([B, T]), which is exp(logp)·(logp − ref_logp) per element, then sums over the time axis: not a
  vocabulary KL. This is the per-element term before that sum.
  """
  lr = _log_ratio(logp, ref_logp)
  return jnp.exp(jnp.asarray(logp, jnp.float32)) * lr


# --------------------------------------------------------------------------------------------------
# SkyRL — skyrl/backends/skyrl_train/utils/ppo_utils.py `compute_approx_kl`;
# skyrl/backends/skyrl_train/workers/worker.py (KL loss); skyrl/train/trainer.py
# `apply_reward_kl_penalty`; skyrl/train/config/config.py `AlgorithmConfig`. Read in the 0.4.0
# wheel (before: skyrl_train-v0.4.0+516, commit a956457): the same KL maths; the in-reward KL is
# computed from the rollout log-probs.


def skyrl_k3(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """SkyRL `k3`: x = clip(ref_logp − logp, −20, 20); clip(eˣ − x − 1, −10, 10) (as verl)."""
  x = jnp.clip(-_log_ratio(logp, ref_logp), -20.0, 20.0)
  return jnp.clip(jnp.exp(x) - x - 1.0, -10.0, 10.0)


def skyrl_k2(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """SkyRL `k2`: ½(logp − ref_logp)²."""
  return 0.5 * jnp.square(_log_ratio(logp, ref_logp))


# --------------------------------------------------------------------------------------------------
# AReaL — areal/trainer/ppo/actor.py (KL-regularized rewards, GAE; joint distillation loss);
# areal/utils/data.py `KLEstimator`; areal/api/cli_args.py (kl_ctl=0.1, kl_estimator="k1",
# ref=None); areal/trainer/rl_trainer.py (ref engine built only if kl_ctl > 0 and ref is set).
# Read at v1.0.4+17, commit 4aef98d (2026-05-21).


def areal_k1(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """AReaL `kl_estimator="k1"` (in reward): clip(logp − ref_logp, −10, 10)."""
  return jnp.clip(_log_ratio(logp, ref_logp), -10.0, 10.0)


def areal_k1_without_ref(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """AReaL defaults (kl_ctl=0.1, no `ref` model): ref_logp is replaced by 0, so clip(logp, −10, 10).

  Subtracted from the reward this is a sampled entropy bonus, not a KL to any reference.
  """
  del ref_logp
  return jnp.clip(jnp.asarray(logp, jnp.float32), -10.0, 10.0)


def areal_kdrl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """AReaL joint distillation (KDRL, rl_loss_weight > 0): logp − teacher_logp as a loss.

  ref_logp is the teacher's.
  """
  return _log_ratio(logp, ref_logp)


def areal_pure_kd(logp, ref_logp, old_logp, mask):
  """AReaL pure distillation (rl_loss_weight = 0): ρ·sg(logp − teacher_logp), ρ live.

  ρ = exp(logp − sg old_logp).

  Shapes [B, T] → [B, T] (ref_logp is the teacher's).
  """
  rho = jnp.exp(_masked_log_weight(logp, old_logp, mask))
  return jnp.where(_keep(mask), rho * _sg(_log_ratio(logp, ref_logp)), 0.0)


# --------------------------------------------------------------------------------------------------
# The gallery.

# What changed in docs/frameworks.md when the gallery moved to the releases of December 2026 and
# the audit began to model when an in-reward penalty is computed (generated into the document).
CHANGE_NOTE = """\
## Change note (December 2026)

The gallery now reads the published releases (verl 0.9.1, TRL 1.16.0, OpenRLHF 0.11.2, SkyRL 0.4.0,
tunix 0.1.7, MaxText 0.2.5; NeMo-RL, slime, ROLL and AReaL at the snapshots cited), and the audit
models *when* an in-reward penalty is computed: every framework read computes it once at rollout,
from π_old's log-probs, and reuses it over the PPO epochs (`penalty_at="rollout"`). Verdicts that
changed:

- verl `use_kl_in_reward=True, kl_penalty=kl`, OpenRLHF's default k1 in reward, ROLL
  `add_token_level_kl=True, kl_penalty=kl` and AReaL's k1 in reward: **off-policy (one token)** was
  "follows ∇RKL" (the penalty was recomputed at the current policy, code nobody runs), is now
  "biased" (0.3 from ∇RKL here): its expected gradient is ∇RKL − ∇KL(π‖π_old).
- The other in-reward rows (k3 or clamped terms, already biased, or zero) keep their verdicts and
  now say where the penalty is computed.
- New row: a sequence-level weight as exp(Σ_t log ρ_t) (the proposal of TRL #5814 and NeMo-RL
  #2269) follows the sequence ∇RKL, where TRL's shipped exp(mean) is biased for sequences.

Notes that changed without a verdict: verl's `+` names run since 0.9.1 (they raised
NotImplementedError before); TRL 1.16.0 defaults `use_bias_correction_kl=True`, its vLLM importance
weight multiplies only the policy-gradient loss and AsyncGRPO has no reference KL; OpenRLHF 0.11.2
ships `--algo.kl.unbiased_gradient` and clamps k3's log-ratio before the exp (no NaN gradient past
log δ ≈ 88.7); NeMo-RL and SkyRL use one estimator setting for loss and reward (k3 in reward by
default); MaxText's shared `rl.yml` runs β = 0.08 on k1 as loss with `use_rollout_logps=True`.
"""

_REVERSE_K1 = "c = log π − log π_ref: ∇RKL"
_FORWARD = "c = 1 − δ: ∇FKL"
_ZERO_K1 = "c = ∂k1/∂logp = 1, E[∇logp] = 0: no regularization"


def _loss(fn, name):
  return audit.elementwise(fn, placement="loss", name=name)


def _reward(fn, name, credit="reward_to_go"):
  return audit.elementwise(fn, placement="reward", credit=credit, name=name)


def _seq(fn, name):
  return audit.sequence(fn, name=name)


GALLERY: tuple[Entry, ...] = (
    # verl: KL is off by default (actor.use_kl_loss=False, algorithm.use_kl_in_reward=False).
    Entry(
        "verl", "actor.use_kl_loss=True, kl_loss_type=low_var_kl (default type; coef 0.001)",
        "k3 as loss; log δ clamped to ±20, value clamped to [−10, 10]",
        _loss(verl_low_var_kl, "verl/low_var_kl"), "forward", _FORWARD,
        f"{_VERL}, verl/trainer/ppo/core_algos.py kl_penalty_forward",
        "value clamp: zero gradient where k3 > 10, i.e. log(π_ref/π) > 2.61 or < −11"),
    Entry(
        "verl", "actor.use_kl_loss=True, kl_loss_type=kl (k1)", "k1 as loss",
        _loss(verl_kl, "verl/kl"), "zero", _ZERO_K1,
        f"{_VERL}, verl/trainer/ppo/core_algos.py kl_penalty_forward", ""),
    Entry(
        "verl", "actor.use_kl_loss=True, kl_loss_type=abs", "|k1| as loss",
        _loss(verl_abs, "verl/abs"), "biased", "c = sign(log π − log π_ref)",
        f"{_VERL}, verl/trainer/ppo/core_algos.py kl_penalty_forward", ""),
    Entry(
        "verl", "actor.use_kl_loss=True, kl_loss_type=mse (k2)", "k2 as loss",
        _loss(verl_mse, "verl/mse"), "reverse", "c = ∂k2/∂logp = k1: ∇RKL",
        f"{_VERL}, verl/trainer/ppo/core_algos.py kl_penalty_forward", ""),
    Entry(
        "verl", "actor.use_kl_loss=True, kl_loss_type=low_var_kl+",
        "value k3 (clamped), gradient of k2 (straight-through)",
        _loss(verl_low_var_kl_plus, "verl/low_var_kl+"), "reverse", "c = ∂k2/∂logp = k1: ∇RKL",
        f"{_VERL}, verl/trainer/ppo/core_algos.py kl_penalty",
        "runs since 0.9.1 strips the '+' (v0.7.0+125 raised NotImplementedError for any '+' name)"),
    Entry(
        "verl", "actor.use_kl_loss=True, kl_loss_type=kl+",
        "value k1, gradient of k2 (straight-through)",
        _loss(verl_kl_plus, "verl/kl+"), "reverse", "c = ∂k2/∂logp = k1: ∇RKL",
        f"{_VERL}, verl/trainer/ppo/core_algos.py kl_penalty",
        "runs since 0.9.1 strips the '+'"),
    Entry(
        "verl", "algorithm.use_kl_in_reward=True, kl_penalty=kl (default; kl_coef 0.001)",
        "β·k1 subtracted from per-token rewards before GRPO sums and group-normalizes them",
        _reward(verl_kl, "verl/kl in reward"), "reverse", "c = k1: ∇RKL",
        f"{_VERL}, verl/trainer/ppo/ray_trainer.py apply_kl_penalty; "
        "verl/trainer/ppo/core_algos.py compute_grpo_outcome_advantage",
        "whole-sequence credit (expected gradient = reward-to-go); β is divided by the group std; "
        "penalty from old_log_probs, reused by every PPO epoch: off-policy ∇RKL − ∇KL(π‖π_old)"),
    Entry(
        "verl", "algorithm.use_kl_in_reward=True, kl_penalty=low_var_kl",
        "β·k3 (clamped) subtracted from per-token rewards before group normalization",
        _reward(verl_low_var_kl, "verl/low_var_kl in reward"), "biased",
        "c = k3 = δ − 1 − log δ: ∇RKL − ∇FKL",
        f"{_VERL}, verl/trainer/ppo/ray_trainer.py apply_kl_penalty",
        "value clamp ±10 caps the penalty"),
    # TRL: β = 0 (no KL) by default.
    Entry(
        "TRL", "beta>0, use_bias_correction_kl=False (the default in v1.9)",
        "k3 as loss, no clamp",
        _loss(trl_k3, "trl/k3"), "forward", _FORWARD,
        f"{_TRL}, trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss",
        "no clamp: exp(log δ) overflows to inf past log δ ≈ 88.7 (float32)"),
    Entry(
        "TRL", "beta>0 (use_bias_correction_kl=True default; importance_sampling_level=token)",
        "ρ·k3 as loss, ρ = exp(logp − old_logp) live per token",
        _seq(trl_k3_token_ratio, "trl/k3·ρ token"), "reverse",
        "c = (1 − δ) + k3 = −log δ: ∇RKL",
        f"{_TRL}, trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss",
        "c = (1 − δ) + k3 cancels in float32: gradient 0 for log δ ≳ 20; inf past log δ ≈ 88.7; "
        "the vLLM importance weight (vllm_importance_sampling_correction) multiplies only the "
        "policy-gradient loss, so the KL is not corrected for the sampler μ; AsyncGRPO has no "
        "reference KL"),
    Entry(
        "TRL", "beta>0, use_bias_correction_kl=True, importance_sampling_level=sequence",
        "s·k3_t as loss, s = exp(mean_t(logp_t − old_t)) live, one ratio per sequence",
        _seq(trl_k3_sequence_ratio, "trl/k3·ρ sequence"), "reverse",
        "one token: s = ρ, c = −log δ; T > 1 adds (Σ_t k3_t)·∇mean_t logp_t (biased)",
        f"{_TRL}, trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss",
        "verdict holds for one token only (TRL #6586, open at 1.16.0): biased for sequences; "
        "float32 cancellation as the token-level ratio"),
    Entry(
        "TRL", "sequence-level weight as exp(Σ_t log ρ_t) instead of exp(mean) (TRL #5814, "
        "NeMo-RL #2269; not shipped)",
        "W·k3_t as loss, W = Π_t ρ_t live (the whole-sequence ratio)",
        _seq(trl_k3_sequence_ratio_sum, "trl/k3·Πρ sequence (proposal)"), "reverse",
        "one token: W = ρ, c = −log δ; sequences: E_old[∇(W Σ_t k3_t)] = ∇E_θ[Σ_t k3_t] = sequence ∇RKL",
        f"{_TRL}, trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss (the mean it replaces)",
        "follows the sequence ∇RKL on- and off-policy; W's variance grows with length (NeMo-RL "
        "#2269 reports a weight of 0.06 where the mean gave 1.0)"),
    # OpenRLHF: KL in reward, k1, init_coef 0.01, on by default.
    Entry(
        "OpenRLHF",
        "--algo.advantage.estimator group_norm; --algo.kl.estimator k1 (default: in reward, 0.01)",
        "β·k1 (clamped ±10) added per token after group_norm of the scalar reward; reward-to-go",
        _reward(openrlhf_k1, "openrlhf/k1 in reward"), "reverse", "c = k1: ∇RKL",
        f"{_OPENRLHF}, openrlhf/models/utils.py compute_approx_kl, compute_reward; "
        "openrlhf/trainer/ppo_utils/experience_maker.py",
        "value clamp ±10 caps the coefficient where |log π/π_ref| > 10; penalty computed in the "
        "experience maker from the rollout log-probs and reused over epochs"),
    Entry(
        "OpenRLHF", "--algo.kl.use_loss --algo.kl.estimator k1", "k1 (clamped ±10) as loss",
        _loss(openrlhf_k1, "openrlhf/k1 loss"), "zero", _ZERO_K1,
        f"{_OPENRLHF}, openrlhf/models/utils.py compute_approx_kl; "
        "openrlhf/trainer/ray/ppo_actor.py",
        "value clamp: zero gradient where |k1| > 10"),
    Entry(
        "OpenRLHF", "--algo.kl.use_loss --algo.kl.estimator k2", "k2 (clamped ±10) as loss",
        _loss(openrlhf_k2, "openrlhf/k2 loss"), "reverse", "c = k1: ∇RKL",
        f"{_OPENRLHF}, openrlhf/models/utils.py compute_approx_kl",
        "value clamp: zero gradient where |k1| > 4.47"),
    Entry(
        "OpenRLHF", "--algo.kl.use_loss --algo.kl.estimator k3", "k3 (clamped ±10) as loss",
        _loss(openrlhf_k3, "openrlhf/k3 loss"), "forward", _FORWARD,
        f"{_OPENRLHF}, openrlhf/models/utils.py compute_approx_kl",
        "value clamp: zero gradient where log δ > 2.61 or < −11; the log-ratio clamp at −10 before "
        "the exp (PR #1335) removed the NaN gradient past log δ ≈ 88.7 of v0.11.0"),
    Entry(
        "OpenRLHF", "--algo.kl.use_loss --algo.kl.unbiased_gradient (PR #1309), estimator k3",
        "value k3, gradient w·k1·∇logp with w = sg(min(π/π_old, 10))",
        _seq(openrlhf_k3_unbiased_gradient, "openrlhf/unbiased_gradient k3"), "reverse",
        "c = w·k1, w = 1 on-policy: ∇RKL",
        f"{_OPENRLHF_PR1309}, openrlhf/models/utils.py compute_approx_kl",
        "opt-in; w clamped at 10 (detached): exact off-policy while π/π_old ≤ 10"),
    # NeMo-RL: k3, β = 0.01, on by default.
    Entry(
        "NeMo-RL", "reference_policy_kl_type=k3 (default; penalty 0.01)",
        "exp(logp − sg logp)·k3 as loss; log r clamped ±20, weighted value clamped ±10",
        _loss(nemo_k3, "nemo/k3·w"), "reverse", "c = (1 − δ) + k3 = −log δ: ∇RKL",
        f"{_NEMO}, nemo_rl/algorithms/utils.py calculate_kl; "
        "nemo_rl/algorithms/loss/loss_functions.py ClippedPGLossFn",
        "output clamp: zero gradient where w·k3 > 10 (log δ > 2.61 or < −11)"),
    Entry(
        "NeMo-RL", "reference_policy_kl_type=k1", "exp(logp − sg logp)·k1 as loss, clamps as k3",
        _loss(nemo_k1, "nemo/k1·w"), "reverse", "c = 1 + k1; E[1·∇logp] = 0: ∇RKL",
        f"{_NEMO}, nemo_rl/algorithms/utils.py calculate_kl", ""),
    Entry(
        "NeMo-RL", "reference_policy_kl_type=k2", "exp(logp − sg logp)·k2 as loss, clamps as k3",
        _loss(nemo_k2, "nemo/k2·w"), "biased", "c = k1 + k2",
        f"{_NEMO}, nemo_rl/algorithms/utils.py calculate_kl", ""),
    Entry(
        "NeMo-RL", "use_on_policy_kl_approximation=True (k3)",
        "exp(logp − gen_logp)·k3 as loss, ratio live; clamps as default",
        _seq(nemo_k3_on_policy_approx, "nemo/k3·π/π_gen"), "reverse",
        "c = (1 − δ) + k3 = −log δ: ∇RKL",
        f"{_NEMO}, nemo_rl/algorithms/loss/loss_functions.py ClippedPGLossFn", ""),
    Entry(
        "NeMo-RL", "use_kl_in_reward=True (reinforce_plus_plus estimator; k3 default)",
        "β·k3 subtracted from each token's advantage (own token), then global normalization",
        _reward(nemo_k3_unweighted, "nemo/k3 in reward", credit="token"), "biased",
        "c = k3: ∇RKL − ∇FKL",
        f"{_NEMO}, nemo_rl/algorithms/advantage_estimator.py ReinforcePlusPlusAdvantageEstimator",
        "one setting (reference_policy_kl_type, default k3) serves loss and reward, so KL in the "
        "reward is k3 by default; token credit only (no reward-to-go); from prev_logprobs (at "
        "rollout)"),
    # tunix: β = 0.04, kl_loss_mode = "kl" by default.
    Entry(
        "tunix", "GrpoConfig(kl_loss_mode='kl') (default; beta 0.04)", "k1 as loss",
        _loss(tunix_kl, "tunix/kl"), "zero", _ZERO_K1,
        f"{_TUNIX}, tunix/rl/common.py compute_kl_divergence; tunix/rl/grpo/grpo_learner.py", ""),
    Entry(
        "tunix", "GrpoConfig(kl_loss_mode='mse_kl')", "k2 as loss",
        _loss(tunix_mse_kl, "tunix/mse_kl"), "reverse", "c = k1: ∇RKL",
        f"{_TUNIX}, tunix/rl/common.py compute_kl_divergence", ""),
    Entry(
        "tunix", "GrpoConfig(kl_loss_mode='low_var_kl')", "k3 as loss, no clamp",
        _loss(tunix_low_var_kl, "tunix/low_var_kl"), "forward", _FORWARD,
        f"{_TUNIX}, tunix/rl/common.py compute_kl_divergence",
        "e^d − d − 1 cancels in float32 near d = 0; optional kl_clamp_value clips after exp: "
        "NaN gradient (0·inf) once e^d overflows"),
    Entry(
        "tunix", "PpoConfig(kl_method='low_var_kl') (default; KL in reward)",
        "β·k3 subtracted from per-token rewards, then GAE (γ=1, λ=0.95)",
        _reward(tunix_low_var_kl, "tunix/ppo low_var_kl in reward"), "biased",
        "c = k3: ∇RKL − ∇FKL", f"{_TUNIX}, tunix/rl/ppo/ppo_learner.py", ""),
    # MaxText passes only beta to tunix.
    Entry(
        "MaxText", "rl.grpo_beta=0.08 (default; kl_loss_mode not exposed → tunix 'kl')",
        "k1 as loss", _loss(tunix_kl, "maxtext/kl"), "zero", _ZERO_K1,
        f"{_MAXTEXT}, maxtext/trainers/post_train/rl/train_rl.py; "
        "maxtext/configs/post_train/rl.yml; maxtext/configs/types.py",
        "rl.yml, shared by its model sizes (the 8B recipes), sets β = 0.08 on a term with zero "
        "expected gradient; use_rollout_logps=True by default (π_old is the rollout engine's μ)"),
    # slime: --use-kl-loss off, --kl-loss-coef 0, --kl-loss-type k1 by default.
    Entry(
        "slime", "--use-kl-loss --kl-loss-type k1 (default type; --kl-loss-coef default 0)",
        "k1 as loss", _loss(slime_k1, "slime/k1"), "zero", _ZERO_K1,
        f"{_SLIME}, slime/utils/ppo_utils.py compute_approx_kl; "
        "slime/backends/megatron_utils/loss.py",
        ""),
    Entry(
        "slime", "--use-kl-loss --kl-loss-type low_var_kl", "k3 as loss, value clamped ±10",
        _loss(slime_low_var_kl, "slime/low_var_kl"), "forward", _FORWARD,
        f"{_SLIME}, slime/utils/ppo_utils.py compute_approx_kl",
        "value clamp (low_var_kl only, not k3): zero gradient where log δ > 2.61 or < −11"),
    Entry(
        "slime", "--use-kl-loss --kl-loss-type k2", "k2 as loss",
        _loss(slime_k2, "slime/k2"), "reverse", "c = k1: ∇RKL",
        f"{_SLIME}, slime/utils/ppo_utils.py compute_approx_kl", ""),
    Entry(
        "slime", "--use-kl-loss --use-unbiased-kl --kl-loss-type low_var_kl",
        "ρ·k3 as loss, ρ = exp(logp − old_logp) live; clamp ±10 on ρ·k3",
        _seq(slime_unbiased_low_var_kl, "slime/unbiased low_var_kl"), "reverse",
        "c = (1 − δ) + k3 = −log δ: ∇RKL",
        f"{_SLIME}, slime/utils/ppo_utils.py compute_approx_kl; "
        "slime/backends/megatron_utils/loss.py",
        "value clamp after the ratio"),
    Entry(
        "slime", "--use-kl-loss --use-unbiased-kl --kl-loss-type k1", "ρ·k1 as loss, ρ live",
        _seq(slime_unbiased_k1, "slime/unbiased k1"), "reverse",
        "c = 1 + k1; E[1·∇logp] = 0: ∇RKL",
        f"{_SLIME}, slime/utils/ppo_utils.py compute_approx_kl", ""),
    Entry(
        "slime", "--use-kl-loss --use-unbiased-kl --kl-loss-type k2", "ρ·k2 as loss, ρ live",
        _seq(slime_unbiased_k2, "slime/unbiased k2"), "biased", "c = k1 + k2",
        f"{_SLIME}, slime/utils/ppo_utils.py compute_approx_kl", ""),
    Entry(
        "slime", "--kl-coef > 0 with --advantage-estimator grpo",
        "nothing: get_grpo_returns ignores the per-token KL",
        _reward(slime_grpo_kl_coef, "slime/kl-coef under grpo"), "zero", "c ≡ 0",
        f"{_SLIME}, slime/utils/ppo_utils.py get_grpo_returns; "
        "slime/backends/megatron_utils/loss.py",
        "--kl-coef reaches only ppo and reinforce_plus_plus(_baseline)"),
    # ROLL: KL off by default (use_kl_loss=False, kl_loss_coef=0, add_token_level_kl=False).
    Entry(
        "ROLL", "use_kl_loss=True (k3 hard-coded; kl_loss_coef default 0)",
        "k3 as loss, value clamped ±10, no input clamp",
        _loss(roll_k3, "roll/k3"), "forward", _FORWARD,
        f"{_ROLL}, roll/utils/functionals.py compute_approx_kl; roll/pipeline/base_worker.py",
        "value clamp: zero gradient where log δ > 2.61 or < −11; NaN gradient past log δ ≈ 88.7"),
    Entry(
        "ROLL", "add_token_level_kl=True, kl_penalty=kl (default; init_kl_coef 0.2)",
        "β·k1 subtracted per token after group normalization of the scalar reward; reward-to-go",
        _reward(roll_kl, "roll/kl in reward"), "reverse", "c = k1: ∇RKL",
        f"{_ROLL}, roll/utils/functionals.py compute_token_reward, compute_reinforce_return", ""),
    Entry(
        "ROLL", "add_token_level_kl=True, kl_penalty=full",
        "β·Σ_t π_t·(logp_t − ref_logp_t) from gathered log-probs, not a vocabulary KL",
        _reward(roll_full, "roll/full in reward"), "biased", "c = π·k1",
        f"{_ROLL}, roll/utils/functionals.py compute_approx_kl",
        "sums over the time axis to [B], then multiplies a [B, T] mask: shape error unless B = T "
        "(then sequences are mixed)"),
    # SkyRL: use_kl_loss=True, k3, coefficient 1e-3 by default.
    Entry(
        "SkyRL", "use_kl_loss=True, kl_estimator_type=k3 (defaults; kl_loss_coef 0.001)",
        "k3 as loss; log δ clamped ±20, value clamped ±10",
        _loss(skyrl_k3, "skyrl/k3"), "forward", _FORWARD,
        f"{_SKYRL}, skyrl/backends/skyrl_train/utils/ppo_utils.py compute_approx_kl; "
        "skyrl/train/config/config.py",
        "value clamp: zero gradient where log δ > 2.61 or < −11"),
    Entry(
        "SkyRL", "use_kl_loss=True, kl_estimator_type=k2", "k2 as loss",
        _loss(skyrl_k2, "skyrl/k2"), "reverse", "c = k1: ∇RKL",
        f"{_SKYRL}, skyrl/backends/skyrl_train/utils/ppo_utils.py compute_approx_kl", ""),
    Entry(
        "SkyRL", "use_kl_in_reward=True, use_kl_loss=False (kl_estimator_type=k3)",
        "β·k3 subtracted from per-token rewards before GRPO sums and group-normalizes them",
        _reward(skyrl_k3, "skyrl/k3 in reward"), "biased", "c = k3: ∇RKL − ∇FKL",
        f"{_SKYRL}, skyrl/train/trainer.py apply_reward_kl_penalty; skyrl/train/config/config.py",
        "one kl_estimator_type (default k3) serves loss and reward, so KL in the reward is k3 by "
        "default; computed from the rollout log-probs"),
    # AReaL: kl_ctl 0.1, k1 in reward, but no reference model unless `ref` is configured.
    Entry(
        "AReaL", "actor.kl_ctl>0, kl_estimator=k1 (default), ref configured",
        "β·k1 (clamped ±10) per token after reward normalization; GAE γ=λ=1 without a critic: "
        "reward-to-go",
        _reward(areal_k1, "areal/k1 in reward"), "reverse", "c = k1: ∇RKL",
        f"{_AREAL}, areal/trainer/ppo/actor.py; areal/utils/data.py KLEstimator", ""),
    Entry(
        "AReaL", "defaults: actor.kl_ctl=0.1, ref=None",
        "ref_logp replaced by 0: β·clip(logp, ±10) subtracted per token (an entropy bonus)",
        _reward(areal_k1_without_ref, "areal/kl_ctl without ref"), "biased",
        "c = log π: ∇KL(π‖uniform) = −∇H(π), an entropy bonus, not a KL to π_ref",
        f"{_AREAL}, areal/trainer/ppo/actor.py; areal/trainer/rl_trainer.py; areal/api/cli_args.py",
        "shipped example YAMLs set kl_ctl 0.0 or 0.001"),
    Entry(
        "AReaL", "teacher set, rl_loss_weight>0 (KDRL joint distillation)",
        "(logp − teacher_logp) as loss (ref = teacher)",
        _loss(areal_kdrl, "areal/kdrl"), "zero", _ZERO_K1,
        f"{_AREAL}, areal/trainer/ppo/actor.py", ""),
    Entry(
        "AReaL", "teacher set, rl_loss_weight=0 (pure distillation)",
        "ρ·sg(logp − teacher_logp) as loss, ρ = exp(logp − old_logp) live (ref = teacher)",
        _seq(areal_pure_kd, "areal/pure kd"), "reverse", "c = k1 (ρ live, value detached): ∇RKL",
        f"{_AREAL}, areal/trainer/ppo/actor.py", ""),
)
