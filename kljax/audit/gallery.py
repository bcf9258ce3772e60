"""The gallery: other RL frameworks' KL options, each with its re-derivation and expected verdict.

`GALLERY` pairs every function of `kljax.audit.frameworks` with the way the framework uses it (as a
loss, or subtracted from the reward with a given credit), a hand-derived on-policy verdict (see that
module's docstring for the derivation), and the framework version and file read;
`gallery_table` audits every entry (`kljax-audit --gallery`, docs/frameworks.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

from kljax.audit import numerics
from kljax.audit.frameworks import (
    areal_k1,
    areal_k1_without_ref,
    areal_kdrl,
    areal_pure_kd,
    nemo_k1,
    nemo_k2,
    nemo_k3,
    nemo_k3_on_policy_approx,
    nemo_k3_unweighted,
    openrlhf_k1,
    openrlhf_k2,
    openrlhf_k3,
    openrlhf_k3_unbiased_gradient,
    roll_full,
    roll_k3,
    roll_kl,
    skyrl_k2,
    skyrl_k3,
    slime_grpo_kl_coef,
    slime_k1,
    slime_k2,
    slime_low_var_kl,
    slime_unbiased_k1,
    slime_unbiased_k2,
    slime_unbiased_low_var_kl,
    trl_k3,
    trl_k3_sequence_ratio,
    trl_k3_sequence_ratio_sum,
    trl_k3_token_ratio,
    tunix_kl,
    tunix_low_var_kl,
    tunix_mse_kl,
    verl_abs,
    verl_kl,
    verl_kl_plus,
    verl_low_var_kl,
    verl_low_var_kl_plus,
    verl_mse,
)
from kljax.audit.implementations import Implementation, elementwise, penalty_kind, sequence
from kljax.audit.report import audit, table_cell

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
  impl: Implementation  # built with elementwise(...) or sequence(...)
  expected: str  # hand-derived on-policy one-token verdict: reverse | forward | zero | biased
  reason: str  # the on-policy gradient coefficient, in one line
  source: str  # framework version, file path and function read
  numerics: str  # clamps and other numerics worth knowing; "" if nothing notable


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
  return elementwise(fn, placement="loss", name=name)


def _reward(fn, name, credit="reward_to_go"):
  return elementwise(fn, placement="reward", credit=credit, name=name)


def _seq(fn, name):
  return sequence(fn, name=name)


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


def gallery_table(entries=None, *, each: Callable[[str], Any] | None = None) -> str:
  """Markdown table of the frameworks' KL terms as audited (entries: GALLERY).
  `each(label)`, when given, is entered as a context around each entry's audit (the command line's
  progress line and timeout)."""
  entries = GALLERY if entries is None else entries
  rows = ["| framework | option | what it computes | on-policy gradient follows | off-policy "
          "(one token) | per-token in a sequence | numerics (measured; notes) |",
          "|---|---|---|---|---|---|---|"]
  for e in entries:
    with (each or (lambda label: contextlib.nullcontext()))(f"{e.framework} {e.option}"):
      r = audit(e.impl)
    measured = numerics.robustness_summary(r.robustness) + (f"; {e.numerics}" if e.numerics else "")
    computes = e.computes + (f"; {penalty_kind(r.penalty_at)}" if r.penalty_at else "")
    rows.append(f"| {e.framework} | {table_cell(e.option)} | {table_cell(computes)} | "
                f"{table_cell(r.settings[0].verdict)} | {table_cell(r.settings[1].verdict)} | "
                f"{table_cell(r.settings[2].verdict)} | {table_cell(measured)} |")
  return "\n".join(rows) + "\n"
