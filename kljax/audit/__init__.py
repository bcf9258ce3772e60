"""Which divergence does this KL code descend? An exact audit of any KL implementation.

Give it a KL term as the code people actually write, and it measures, by exact enumeration of small
tabular policies (no sampling noise), the *expected* gradient that code makes an optimizer follow,
then names it:

  ∇RKL   ∇ KL(π‖π_ref), the reverse KL (the objective of KL-regularized RL)
  ∇FKL   ∇ KL(π_ref‖π), the forward KL
  frozen-prefix ∇RKL / ∇FKL  (sequences) Σ_t of each position's KL with its prefix law held fixed:
         what per-token penalties without reward-to-go credit follow. Off-policy there are two,
         named by their prefix law: "prefixes from π_θ" (the on-policy target, which a whole-
         sequence ratio Π_t π/π_old recovers) and "prefixes from π_old" (what per-token ratios
         give: a token's ratio fixes that token's law, not its prefix's)
  0      no regularization at all

A gradient "follows" a target when it equals a positive multiple s of it to relative precision `tol`
(s ≠ 1 is reported: it rescales β). Otherwise it is "biased", with the nearest target and distance.

Inputs (`implementation` dispatches on them):
  elementwise(fn, placement="loss"|"reward", credit="token"|"reward_to_go")
      fn(logp, ref_logp) -> per-element value. "loss": the framework differentiates fn. "reward":
      it adds −β·sg(fn) to the reward of that token (or to every earlier token, reward-to-go), so
      the gradient is E[sg(c)·∇logp], importance-weighted by ρ = π/π_old off-policy (the PPO ratio
      that multiplies the advantage). `penalty_at` says when c is computed: "rollout" (default)
      from π_old's log-probs, once, held over later epochs and minibatches (verl's
      `apply_kl_penalty`, kljax's trainer by default): off-policy k1 then follows
      ∇RKL − ∇KL(π‖π_old); "current" at the parameters being updated: ∇RKL for one token.
  sequence(fn)
      fn(logp_t, ref_logp_t, old_logp_t, mask_t) -> per-token loss [B, T], for code that needs the
      sampling policy or mixes tokens (live ratios, sequence-level geometric-mean ratios). On-policy
      the audit passes old_logp_t = sg(logp_t), as a trainer does.
  a `kljax.KLTerm`, or a name for `kljax.kl_term`.
  from_torch(fn, signature=...) makes a PyTorch function of either signature auditable: values and
      derivatives come from torch autograd, so the code a framework runs is what is measured.

Not audited: the per-position exact terms of `kljax.full_kl` ("exact_rkl_as_loss", "exact_rkl_rb",
"top64_rkl_as_loss", ...; placement "full"). They read the whole next-token distribution at each
position (hidden states and unembedding), which no per-token signature carries; `from_term` raises
`AuditError` for them. What they follow is proved by exact enumeration with
`kljax.exact.expected_gradient_full` (tests/test_full_kl.py) and listed in the README.

Settings: one token (V = 6) and autoregressive sequences (V = 3, T = 3) on- and off-policy (π_old = π
plus N(0, 0.15²) logit noise), and variable-length sequences that stop at an EOS token (token 0),
where the aggregation matters: "sum" (Σ_t), "token_mean" (Σ_t / E|y|: a constant, so a rescaling
only) and "seq_mean_token_mean" (Σ_t / |y| per sequence: a 1/|y| weight that changes the target).
π and π_ref have N(0, 0.5²) logits: ordinary log-ratios (|log δ| ≲ 2), so a value clamp of ±10 is
inactive there; the robustness section probes the extremes.

Also measured: the on-policy coefficient c(log δ) of the one-token gradient E[c·∇logp] on a grid,
identified against the known ones; the exact bias and spread of the value as an estimate of
KL(π‖π_ref) and KL(π_ref‖π); non-finite values or gradients for |log δ| up to 100 in float32 and
bfloat16; and gradients a clamp sets to zero where the coefficient is finite and non-zero nearer
to log δ = 0.

`--expect` / `assert_follows` check every setting the report runs, or those named (`--setting`).

Layout: `implementations` (the one form an audit runs), `torch_bridge` (`from_torch`), `report`
(`audit`, `AuditReport`, expectations), `numerics` (coefficient, value, robustness), `frameworks`
and `gallery` (other frameworks' KL code, `GALLERY`), `cli` (`main`). The enumeration is
`kljax.exact`'s and the verdicts are `kljax.gradient_table`'s, the engine behind the
reproduction's oracle table too. The generated documents are written by `experiments/audit_docs.py`.

References:
  Liu et al., "Rethinking KL Regularization in RLHF", arXiv:2510.01555 (2025), §4–§6.
"""

from kljax.audit.cli import TIMEOUT_STATUS, main
from kljax.audit.gallery import GALLERY, Entry, gallery_table
from kljax.audit.implementations import (
    PENALTY_AT,
    AuditError,
    Credit,
    Implementation,
    PenaltyAt,
    Placement,
    check,
    elementwise,
    from_term,
    implementation,
    sequence,
    signature_of,
)
from kljax.audit.numerics import COEFFICIENT_GRID, robustness_summary
from kljax.audit.report import (
    EXPECTATIONS,
    PENALTY_NOTE,
    SETTING_KEYS,
    SETTINGS,
    Aggregation,
    AuditReport,
    accepted,
    assert_follows,
    audit,
    disagreements,
    resolve_settings,
    terms_table,
    to_json,
)
from kljax.audit.torch_bridge import from_torch
from kljax.exact import AGGREGATIONS, PREFIX_OLD, PREFIX_THETA, expected_gradient
from kljax.gradient_table import AUDIT_POLICY_SCALE as POLICY_SCALE
from kljax.gradient_table import Setting, SettingResult

__all__ = [
    "AGGREGATIONS", "COEFFICIENT_GRID", "EXPECTATIONS", "GALLERY", "PENALTY_AT", "PENALTY_NOTE",
    "POLICY_SCALE", "PREFIX_OLD", "PREFIX_THETA", "SETTINGS", "SETTING_KEYS", "TIMEOUT_STATUS",
    "Aggregation", "AuditError", "AuditReport", "Credit", "Entry", "Implementation", "PenaltyAt",
    "Placement", "Setting", "SettingResult", "accepted", "assert_follows", "audit", "check",
    "disagreements", "elementwise", "expected_gradient", "from_term", "from_torch",
    "gallery_table", "implementation", "main", "resolve_settings", "robustness_summary",
    "sequence", "signature_of", "terms_table", "to_json",
]
