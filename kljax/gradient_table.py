"""The gradient table: which divergence each KL term's expected gradient equals, measured exactly.

For each term and each setting (one-token or autoregressive policy, on- or off-policy, per-token or
sequence-level surrogate) the exact expected gradient g of `kljax.exact.expected_gradient` is
compared with the analytic gradients of the divergences, computed from their definitions:

  ∇RKL = ∇KL(π‖π_ref),  ∇FKL = ∇KL(π_ref‖π),  and for sequences the frozen-prefix ∇RKL and ∇FKL
  (each position's KL with its prefix law held fixed: what per-token k2-as-loss, respectively
  k3-as-loss, follows; off-policy the prefixes are weighted by π_old, which per-token importance
  ratios leave uncorrected).

A distance is relative, ‖g − target‖ / ‖target‖, and a term "follows" a target when that distance is
below `tol`. The coefficient c of each term (its gradient is E[c·∇logp] on-policy) is identified
numerically against the closed forms, not read from a table.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kljax import exact
from kljax.kl import kl_term, kl_term_names


class Setting(NamedTuple):
  name: str
  vocab: int
  length: int
  off_policy: bool
  level: str  # "token" or "sequence": where the surrogate is applied


SETTINGS = (
    Setting("one token, on-policy", 6, 1, False, "token"),
    Setting("one token, off-policy", 6, 1, True, "token"),
    Setting("sequence, per-token terms, on-policy", 3, 3, False, "token"),
    Setting("sequence, per-token terms, off-policy", 3, 3, True, "token"),
    Setting("sequence, sequence-level terms, on-policy", 3, 3, False, "sequence"),
)

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
  to_frozen: float  # nan for one-token settings
  to_frozen_fkl: float  # nan for one-token settings
  follows: str


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


def _relative(a, b) -> float:
  return exact.tree_norm(tuple(x - y for x, y in zip(a, b))) / max(exact.tree_norm(b), 1e-30)


def _follows(row: dict, tol: float) -> str:
  if row["grad_norm"] <= tol * row["rkl_norm"]:
    return "0"
  names = [("∇RKL", row["to_rkl"]), ("∇FKL", row["to_fkl"]),
           ("frozen-prefix ∇RKL", row["to_frozen"]), ("frozen-prefix ∇FKL", row["to_frozen_fkl"])]
  hits = [n for n, d in names if d <= tol]
  return hits[0] if hits else "neither (biased)"


def table(terms: Sequence[str] | None = None, settings: Sequence[Setting] = SETTINGS, *,
          seed: int = 0, old_scale: float = 0.15, tol: float = 1e-4) -> list[Row]:
  """One `Row` per (setting, term). π, π_ref are random tabular policies; off-policy, π_old is π
  with N(0, old_scale²) added to its logits (close enough that the clipped correction's ratios stay
  inside a 0.2 clip range: there it is exact).

  Args:
    terms: names from `kl_term_names()` (default: all of them).
    settings: the `Setting`s to evaluate.
    seed: seeds π, π_ref and π_old.
    old_scale: how far π_old is from π (logit noise scale).
    tol: relative distance below which a gradient counts as equal to a target.
  """
  terms = list(kl_term_names() if terms is None else terms)
  for name in terms:
    kl_term(name)  # a bad name fails here, before any work
  rows = []
  for i, s in enumerate(settings):
    kp, kq, ko = jax.random.split(jax.random.PRNGKey(seed + 1000 * i), 3)
    policy = exact.random_tabular(kp, vocab=s.vocab, length=s.length)
    ref = exact.random_tabular(kq, vocab=s.vocab, length=s.length)
    old = None
    if s.off_policy:
      noise = exact.random_tabular(ko, vocab=s.vocab, length=s.length, scale=old_scale)
      old = tuple(p + n for p, n in zip(policy, noise))
    rkl, fkl = exact.rkl_grad(policy, ref), exact.fkl_grad(policy, ref)
    frozen = frozen_fkl = None
    if s.length > 1:  # off-policy, per-token ratios leave the prefixes distributed as under π_old
      frozen = exact.frozen_prefix_rkl_grad(policy, ref, prefixes=old)
      frozen_fkl = exact.frozen_prefix_fkl_grad(policy, ref, prefixes=old)
    for name in terms:
      if s.level == "sequence" and "_rtg" in name:
        continue  # reward-to-go credit needs a time axis; a sequence-level surrogate has none
      g = exact.expected_gradient(kl_term(name), policy, ref, old=old, level=s.level)
      d = {"grad_norm": exact.tree_norm(g), "rkl_norm": exact.tree_norm(rkl),
           "to_rkl": _relative(g, rkl), "to_fkl": _relative(g, fkl),
           "to_frozen": _relative(g, frozen) if frozen is not None else float("nan"),
           "to_frozen_fkl": _relative(g, frozen_fkl) if frozen_fkl is not None else float("nan")}
      rows.append(Row(name, s.name, identify_coefficient(name), d["grad_norm"], d["to_rkl"],
                      d["to_fkl"], d["to_frozen"], d["to_frozen_fkl"], _follows(d, tol)))
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
