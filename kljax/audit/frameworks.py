"""What other RL frameworks' KL terms compute, re-derived from their source as JAX functions.

Each function below is a small pure JAX re-statement of one framework's KL code path, written from
reading that framework's source (facts carry over; no code was copied). A comment above each
function names the file, function and version read. `kljax.audit.gallery.GALLERY` pairs every
function with the way the
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

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

_sg = jax.lax.stop_gradient


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
