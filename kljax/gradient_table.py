"""The gradient table: which divergence each KL term's expected gradient equals, measured exactly.

For each term and each setting (one-token or autoregressive policy, fixed or variable length, on- or
off-policy, per-token or sequence-level surrogate) the exact expected gradient g of
`kljax.exact.expected_gradient` is compared with the analytic gradients of the divergences,
`kljax.exact.divergence_gradients`, computed from their definitions:

  ∇RKL = ∇KL(π‖π_ref),  ∇FKL = ∇KL(π_ref‖π),  and for sequences the frozen-prefix ∇RKL and ∇FKL
  (each position's KL with its prefix law held fixed: what per-token k2-as-loss, respectively
  k3-as-loss, follows; off-policy once per prefix law, π_θ or π_old, which per-token importance
  ratios leave uncorrected).

This module is the one verdict engine: `kljax.audit` (and so README.md's generated terms table)
and the reproduction's oracle table (`table`) both label gradients with `evaluate`, on the settings
they name (`AUDIT_SETTINGS`, `SETTINGS`). A gradient "follows" a target when it equals a positive
multiple s of it to relative precision `tol` (s ≠ 1 is reported in the verdict: it rescales β), "0"
when its norm is below `tol`·‖∇RKL‖, and is "biased" otherwise, with the nearest target. The
coefficient c of each term (its gradient is E[c·∇logp] on-policy) is identified numerically against
the closed forms, not read from a table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kljax import exact
from kljax.kl import kl_term, kl_term_names


class Setting(NamedTuple):
  """Where a gradient is measured: the policies' shape and law, and how the data was sampled."""

  name: str
  vocab: int
  length: int
  off_policy: bool
  level: str = "token"  # "token" or "sequence": where the surrogate is applied
  eos: bool = False  # token 0 ends a sequence: variable lengths, where the aggregation matters
  scale: float = 1.0  # π and π_ref have N(0, scale²) logits
  old_scale: float = 0.15  # off-policy, π_old = π + N(0, old_scale²) logit noise


# The reproduction's oracle table (`table`).
SETTINGS = (
    Setting("one token, on-policy", 6, 1, False, "token"),
    Setting("one token, off-policy", 6, 1, True, "token"),
    Setting("sequence, per-token terms, on-policy", 3, 3, False, "token"),
    Setting("sequence, per-token terms, off-policy", 3, 3, True, "token"),
    Setting("sequence, sequence-level terms, on-policy", 3, 3, False, "sequence"),
)
# The audit's (`kljax.audit.audit`, README.md's terms table). Logit scale 0.5: ordinary log-ratios
# (|log δ| ≲ 2), so that a value clamp of ±10 is inactive; the audit probes the extremes apart.
AUDIT_POLICY_SCALE = 0.5
AUDIT_SETTINGS = (
    Setting("one token, on-policy", 6, 1, False, scale=AUDIT_POLICY_SCALE),
    Setting("one token, off-policy", 6, 1, True, scale=AUDIT_POLICY_SCALE),
    Setting("sequences, on-policy", 3, 3, False, scale=AUDIT_POLICY_SCALE),
    Setting("sequences, off-policy", 3, 3, True, scale=AUDIT_POLICY_SCALE),
    Setting("variable-length sequences (EOS), on-policy", 3, 4, False, eos=True,
            scale=AUDIT_POLICY_SCALE),
)


# ---- Policies and targets of a setting ----


def policies(s: Setting, seed: int):
  """(π, π_ref, π_old or None) of a setting, random tabular policies seeded by `seed`."""
  kp, kq, ko = jax.random.split(jax.random.PRNGKey(seed), 3)
  policy = exact.random_tabular(kp, vocab=s.vocab, length=s.length, scale=s.scale)
  ref = exact.random_tabular(kq, vocab=s.vocab, length=s.length, scale=s.scale)
  old = None
  if s.off_policy:
    noise = exact.random_tabular(ko, vocab=s.vocab, length=s.length, scale=s.old_scale)
    old = tuple(p + n for p, n in zip(policy, noise))
  return policy, ref, old


def space_of(s: Setting) -> exact.Space:
  return exact.sequence_space(s.vocab, s.length, eos=s.eos)


def flat(tree) -> np.ndarray:
  """The tables of a gradient as one float64 vector."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in tree])


@functools.lru_cache(maxsize=64)
def _setting_data(s: Setting, seed: int):
  """(π, π_ref, π_old, space, {target name: flat gradient}) of a setting, computed once: every
  term measured in a setting is compared with the same targets."""
  policy, ref, old = policies(s, seed)
  space = space_of(s)
  targets = exact.divergence_gradients(policy, ref, old=old, space=space)
  return policy, ref, old, space, {k: flat(v) for k, v in targets.items()}


# ---- Verdicts ----


@dataclasses.dataclass
class SettingResult:
  setting: str
  relative_norm: float  # max over seeds of ‖g‖/‖∇RKL‖
  distance: dict[str, float]  # target -> max over seeds of ‖g − t‖/‖t‖
  scale_free: dict[str, float]  # target -> max over seeds of min_{s>0} ‖g − s·t‖/‖g‖
  scale: dict[str, list[float]]  # target -> [min, max] over seeds of the best s
  verdict: str
  # "∇RKL", "∇FKL", "frozen-prefix ∇RKL", "frozen-prefix ∇FKL" (on-policy; off-policy with
  # exact.PREFIX_THETA or PREFIX_OLD appended: the prefix law), "0" or "biased"
  follows: str


def measure(g: np.ndarray, targets: dict[str, np.ndarray]) -> dict[str, Any]:
  """One seed's distances of a flat gradient to every flat target, absolute and up to a scale."""
  gn = np.linalg.norm(g)
  res = {"grad_norm": float(gn), "norm": gn / max(np.linalg.norm(targets["∇RKL"]), 1e-30),
         "distance": {}, "scale_free": {}, "scale": {}}
  for k, t in targets.items():
    tn2 = float(t @ t)
    s = max(float(g @ t) / max(tn2, 1e-60), 0.0)
    res["distance"][k] = float(np.linalg.norm(g - t) / max(np.sqrt(tn2), 1e-30))
    res["scale_free"][k] = float(np.linalg.norm(g - s * t) / max(gn, 1e-30)) if s > 0 else 1.0
    res["scale"][k] = s
  return res


def summarize(setting: str, per_seed: list[dict], tol: float) -> SettingResult:
  """The verdict of a setting over its seeds: a target is followed only if it is in every seed."""
  keys = per_seed[0]["distance"].keys()
  distance = {k: max(r["distance"][k] for r in per_seed) for k in keys}
  scale_free = {k: max(r["scale_free"][k] for r in per_seed) for k in keys}
  scale = {k: [min(r["scale"][k] for r in per_seed), max(r["scale"][k] for r in per_seed)]
           for k in keys}
  norm = max(r["norm"] for r in per_seed)
  result = functools.partial(SettingResult, setting, norm, distance, scale_free, scale)
  if norm <= tol:
    return result("zero (no regularization)", "0")
  for k in keys:
    if scale_free[k] <= tol and scale[k][0] > 0:
      lo, hi = scale[k]
      extra = "" if max(abs(lo - 1), abs(hi - 1)) <= 1e-3 else (
          f" (×{lo:.3g})" if abs(hi - lo) <= 1e-3 * hi else f" (×{lo:.3g}…{hi:.3g})")
      return result(f"follows {k}{extra}", k)
  nearest = min(keys, key=lambda k: scale_free[k])
  at = ", at" if "," in nearest else " at"
  return result(f"biased: nearest {nearest}{at} {scale_free[nearest]:.2g}", "biased")


def evaluate(term, s: Setting, *, seeds: Sequence[int] = (0,), tol: float = 1e-4,
             aggregation: str = "sum", level: str | None = None
             ) -> tuple[SettingResult, list[dict]]:
  """What `term`'s exact expected gradient follows in setting `s`, over the seeds given.

  Args:
    term: anything `kljax.exact.expected_gradient` takes (a `KLTerm`, an audit `Implementation`).
    s: the setting; seeds: the seeds of its random policies; tol: relative tolerance.
    aggregation: see `kljax.exact.expected_gradient`.
    level: "token" or "sequence" (default: the setting's); one-token settings are always "token".
  Returns:
    the `SettingResult`, and each seed's measurements (`measure`).
  """
  level = "token" if s.length == 1 else (s.level if level is None else level)
  per_seed = []
  for seed in seeds:
    policy, ref, old, space, targets = _setting_data(s, seed)
    # Eager on purpose: each term's graph differs, and op-by-op dispatch (whose per-primitive
    # compiles are cached across terms) is faster here than compiling every term whole.
    g = exact.expected_gradient(term, policy, ref, old=old, space=space, aggregation=aggregation,
                                level=level)
    per_seed.append(measure(flat(g), targets))
  return summarize(s.name, per_seed, tol), per_seed


# ---- The oracle table ----

# The closed forms a coefficient is matched against (δ = π_ref/π).
_COEFFICIENTS = {
    "1": lambda lp, lq: jnp.ones_like(lp),
    "log π − log π_ref": lambda lp, lq: lp - lq,
    "1 − δ": lambda lp, lq: 1 - jnp.exp(lq - lp),
    "½(log δ)²": lambda lp, lq: 0.5 * (lq - lp) ** 2,
    "δ − 1 − log δ": lambda lp, lq: jnp.exp(lq - lp) - 1 - (lq - lp),
    # live-ratio terms: ∂k/∂logp + k
    "1 + log π − log π_ref": lambda lp, lq: 1 + lp - lq,
    "(log π − log π_ref) + ½(log δ)²": lambda lp, lq: (lp - lq) + 0.5 * (lq - lp) ** 2,
}


class Row(NamedTuple):
  term: str
  setting: str
  coefficient: str
  grad_norm: float
  to_rkl: float
  to_fkl: float
  to_frozen: float  # nan for one-token settings; off-policy: prefixes from π_old
  to_frozen_fkl: float  # nan for one-token settings; off-policy: prefixes from π_old
  follows: str  # SettingResult.follows, with " (×s)" for a positive multiple s ≠ 1 of it


def identify_coefficient(name: str, *, seed: int = 0) -> str:
  """The closed form that matches `kl_term(name).coefficient` on a random categorical policy."""
  key_p, key_q = jax.random.split(jax.random.PRNGKey(seed))
  # 16 one-token sequences: [16, 1], so reward-to-go credit is the token's own coefficient
  lp = jax.nn.log_softmax(jax.random.normal(key_p, (16,)))[:, None]
  lq = jax.nn.log_softmax(jax.random.normal(key_q, (16,)))[:, None]
  c = kl_term(name).coefficient(lp, lq)
  for label, form in _COEFFICIENTS.items():
    if np.allclose(c, form(lp, lq), rtol=1e-5, atol=1e-6):
      return label
  return "other"


def _short(result: SettingResult) -> str:
  """The follows-label with the scale of a rescaled target: "∇RKL", "∇RKL (×2)", "0", "biased"."""
  if result.follows in ("0", "biased"):
    return result.follows
  return result.verdict.removeprefix("follows ")


def table(terms: Sequence[str] | None = None, settings: Sequence[Setting] = SETTINGS, *,
          seed: int = 0, old_scale: float = 0.15, tol: float = 1e-4) -> list[Row]:
  """One `Row` per (setting, term), each from `evaluate` on one seed: π, π_ref are random tabular
  policies; off-policy, π_old is π with N(0, old_scale²) added to its logits (close enough that the
  clipped correction's ratios stay inside a 0.2 clip range: there it is exact).

  Args:
    terms: names from `kl_term_names()` (default: all of them).
    settings: the `Setting`s to evaluate.
    seed: seeds π, π_ref and π_old (setting i uses seed + 1000·i).
    old_scale: how far π_old is from π (logit noise scale), replacing each setting's.
    tol: relative distance below which a gradient counts as equal to a target.
  """
  terms = list(kl_term_names() if terms is None else terms)
  for name in terms:
    kl_term(name)  # a bad name fails here, before any work
  rows = []
  for i, s in enumerate(settings):
    s = s._replace(old_scale=old_scale)
    frozen_suffix = exact.PREFIX_OLD if s.off_policy else ""
    for name in terms:
      if s.level == "sequence" and "_rtg" in name:
        continue  # reward-to-go credit needs a time axis; a sequence-level surrogate has none
      result, per_seed = evaluate(kl_term(name), s, seeds=(seed + 1000 * i,), tol=tol)
      d = result.distance
      rows.append(Row(name, s.name, identify_coefficient(name), per_seed[0]["grad_norm"],
                      d["∇RKL"], d["∇FKL"], d.get("frozen-prefix ∇RKL" + frozen_suffix, np.nan),
                      d.get("frozen-prefix ∇FKL" + frozen_suffix, np.nan), _short(result)))
  return rows


def markdown(rows: Sequence[Row]) -> str:
  """The rows as one markdown table per setting."""
  out = []
  for setting in dict.fromkeys(r.setting for r in rows):
    out += [f"**{setting}**", "",
            "| KL term | coefficient c | ‖g‖ | ‖g − ∇RKL‖/‖∇RKL‖ | ‖g − ∇FKL‖/‖∇FKL‖ "
            "| ‖g − frozen RKL‖/‖·‖ | ‖g − frozen FKL‖/‖·‖ | follows |",
            "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.setting == setting):
      frozen = "—" if np.isnan(r.to_frozen) else f"{r.to_frozen:.1e}"
      frozen_fkl = "—" if np.isnan(r.to_frozen_fkl) else f"{r.to_frozen_fkl:.1e}"
      out.append(f"| `{r.term}` | {r.coefficient} | {r.grad_norm:.3f} | {r.to_rkl:.1e} | "
                 f"{r.to_fkl:.1e} | {frozen} | {frozen_fkl} | {r.follows} |")
    out.append("")
  return "\n".join(out)
