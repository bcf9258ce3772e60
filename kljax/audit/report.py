"""The audit itself: `audit` runs an implementation through the settings and names what its exact
expected gradient follows (`kljax.gradient_table.evaluate`, the engine the reproduction's oracle
table uses too), with its coefficient, value statistics and numerics (`numerics`); `AuditReport`
renders it; `assert_follows` and `disagreements` check it against an expectation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Literal, Sequence

import numpy as np

from kljax import gradient_table
from kljax.audit import numerics
from kljax.audit.implementations import (
    PENALTY_AT,
    Credit,
    PenaltyAt,
    Placement,
    check,
    implementation,
)
from kljax.exact import AGGREGATIONS, PREFIX_OLD, PREFIX_THETA
from kljax.gradient_table import Setting, SettingResult
from kljax.kl import kl_term

Aggregation = Literal["sum", "token_mean", "seq_mean_token_mean"]
SETTINGS = gradient_table.AUDIT_SETTINGS
PENALTY_NOTE = {
    "rollout": "In-reward penalty computed **at rollout**, from π_old's log-probs, and held fixed "
               "over every later epoch and minibatch (verl's `apply_kl_penalty`, kljax's "
               "`kl.reward_at=\"rollout\"`): off-policy the surrogate is sg(c(π_old))·ρ.",
    "current": "In-reward penalty recomputed **at the current parameters** in every epoch and "
               "minibatch (kljax's `kl.reward_at=\"current\"`): off-policy the surrogate is "
               "sg(c(π_θ))·ρ."}
EXPECTATIONS = {"reverse": "∇RKL", "forward": "∇FKL", "zero": "0",
                "frozen_reverse": "frozen-prefix ∇RKL", "frozen_forward": "frozen-prefix ∇FKL",
                "frozen_reverse_old": "frozen-prefix ∇RKL" + PREFIX_OLD,
                "frozen_forward_old": "frozen-prefix ∇FKL" + PREFIX_OLD}


@dataclasses.dataclass
class AuditReport:
  """What an implementation's gradient follows, and how its value and numerics behave."""

  name: str
  kind: str
  aggregation: str
  level: str
  seeds: int
  tol: float
  settings: list[SettingResult]
  coefficient: dict[str, Any]
  value: dict[str, float]
  robustness: dict[str, Any]
  # In-reward penalties: "rollout" (from π_old, held over epochs) or "current"; None otherwise.
  penalty_at: str | None = None

  def result(self, setting: str) -> SettingResult:
    for r in self.settings:
      if r.setting == setting:
        return r
    raise KeyError(f"no setting {setting!r}; have {[r.setting for r in self.settings]}.")

  @property
  def on_policy(self) -> str:
    """The follows-label of the first setting (one token, on-policy, unless `settings` says else)."""
    return self.settings[0].follows

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def markdown(self) -> str:
    out = [f"## Audit of `{self.name}` ({self.kind})", "",
           f"Aggregation `{self.aggregation}`, {self.level}-level, {self.seeds} random policies "
           f"per setting, tolerance {self.tol:g} (relative).", ""]
    if self.penalty_at:
      out += [PENALTY_NOTE[self.penalty_at], ""]
    out += ["| setting | ‖g‖/‖∇RKL‖ | to ∇RKL | to ∇FKL | to frozen ∇RKL | to frozen ∇FKL | verdict |",
            "|---|---|---|---|---|---|---|"]

    def cell(r, k):
      if k in r.distance:
        return f"{r.distance[k]:.1e}"
      laws = [(law, r.distance[k + suffix]) for law, suffix in (("π_θ", PREFIX_THETA),
                                                                 ("π_old", PREFIX_OLD))
              if k + suffix in r.distance]
      return " / ".join(f"{d:.1e} (prefixes {law})" for law, d in laws) or "—"

    for r in self.settings:
      d = [cell(r, k) for k in ("∇RKL", "∇FKL", "frozen-prefix ∇RKL", "frozen-prefix ∇FKL")]
      out.append(f"| {r.setting} | {r.relative_norm:.3g} | " + " | ".join(d) + f" | {r.verdict} |")
    c = self.coefficient
    out += ["", f"**On-policy coefficient** (gradient = E[c·∇logp], one token): c(log δ) "
            f"{c['identified']}."]
    v = self.value
    out += ["", "**Value as an estimate** (exact expectation over one-token policies): bias "
            f"{v['relative_bias_rkl']:+.2%} of KL(π‖π_ref), {v['relative_bias_fkl']:+.2%} of "
            f"KL(π_ref‖π); single-sample std {v['relative_std_rkl']:.2f}× KL(π‖π_ref)."]
    out += ["", "**Numerics** (|log δ| ≤ 100): "
            + numerics.robustness_summary(self.robustness) + "."]
    return "\n".join(out) + "\n"


def audit(obj: Any, *, placement: Placement = "loss", credit: Credit = "token",
          signature: Literal["elementwise", "sequence"] = "elementwise",
          aggregation: Aggregation = "sum", level: Literal["token", "sequence"] = "token",
          settings: Sequence[Setting] = SETTINGS, seeds: int = 3, tol: float = 1e-4,
          penalty_at: PenaltyAt | None = None, name: str | None = None,
          progress: Callable[[str], None] | None = None) -> AuditReport:
  """Audits a KL implementation: what its exact expected gradient follows in every setting.

  Args:
    obj: an elementwise `fn(logp, ref_logp)`, a per-sequence `fn(logp_t, ref_logp_t, old_logp_t,
      mask_t)` (with signature="sequence"), a `KLTerm`, a `kl_term` name, or an `Implementation`.
    placement, credit: how an elementwise fn is used (see `elementwise`).
    signature: "elementwise" or "sequence" for a plain callable.
    aggregation: "sum", "token_mean" or "seq_mean_token_mean" over the tokens of a sequence.
    level: "token" (per-token log-probs) or "sequence" (the fn applied to Σ_t logp; elementwise only).
    settings: the `Setting`s; seeds: random policies per setting; tol: relative tolerance.
    penalty_at: for in-reward penalties (placement="reward", or an in-reward kljax term): "rollout"
      (default: computed once from π_old and reused over epochs, as verl and kljax's trainer do)
      or "current" (recomputed at the current parameters). See `elementwise`.
    name: a label.
    progress: called with a line before each stage (the checks, each setting, the coefficient).
  Raises:
    AuditError when the callable has the wrong signature, shape or dtype, or is not finite.
  """
  say = progress or (lambda line: None)
  key = (obj, placement, credit, signature, aggregation, level, tuple(settings), seeds, tol,
         penalty_at, name)
  if isinstance(obj, str) and key in _MEMO:  # kljax names are pure: audit each once per process
    return _MEMO[key]
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}.")
  if level not in ("token", "sequence"):
    raise ValueError(f"level must be 'token' or 'sequence', got {level!r}.")
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}.")
  impl = implementation(obj, placement=placement, credit=credit, signature=signature,
                        penalty_at=penalty_at, name=name)
  if level == "sequence" and not impl.elementwise:
    raise ValueError("level='sequence' applies an elementwise penalty to whole-sequence log-probs; "
                     f"{impl.name} is a per-sequence surrogate already.")
  say(f"{impl.name}: checking its signature, shapes and values")
  check(impl)
  results = []
  for i, s in enumerate(settings):
    say(f"{impl.name}: setting {i + 1} of {len(settings)}, {s.name} ({seeds} seeds)")
    results.append(gradient_table.evaluate(impl, s, seeds=range(seeds), tol=tol,
                                           aggregation=aggregation, level=level)[0])
  say(f"{impl.name}: the coefficient c(log δ), value statistics and robustness")
  grid = np.asarray(numerics.COEFFICIENT_GRID)
  coefficient = numerics.identify(grid, numerics.coefficients(impl, grid)[0])
  report = AuditReport(impl.name, impl.kind, aggregation, level, seeds, tol, results, coefficient,
                       numerics.value_stats(impl, seeds), numerics.robustness(impl),
                       impl.penalty_at)
  if isinstance(obj, str):
    _MEMO[key] = report
  return report


_MEMO: dict[tuple, AuditReport] = {}


# Short names of the settings for the command line (`--setting seq-on`); full names work too.
SETTING_KEYS = {"token-on": SETTINGS[0].name, "token-off": SETTINGS[1].name,
                "seq-on": SETTINGS[2].name, "seq-off": SETTINGS[3].name, "eos-on": SETTINGS[4].name}


def accepted(expected: str, setting: Setting) -> str:
  """The follows-label that agrees with `expected` in `setting`.

  "reverse", "forward", "zero": ∇RKL, ∇FKL, 0 in every setting. "frozen_reverse"/"frozen_forward":
  the frozen-prefix gradient with prefixes from π_θ (what a per-token term follows on-policy), which
  for one token is ∇RKL/∇FKL itself; "frozen_reverse_old"/"frozen_forward_old": with prefixes from
  π_old off-policy (per-token importance ratios), the same as the former on-policy.
  """
  if expected not in EXPECTATIONS:
    raise ValueError(f"expected must be one of {', '.join(EXPECTATIONS)}, got {expected!r}.")
  if not expected.startswith("frozen_"):
    return EXPECTATIONS[expected]
  short = "RKL" if expected.startswith("frozen_reverse") else "FKL"
  if setting.length == 1:
    return f"∇{short}"
  if not setting.off_policy:
    return f"frozen-prefix ∇{short}"
  return f"frozen-prefix ∇{short}" + (PREFIX_OLD if expected.endswith("_old") else PREFIX_THETA)


def resolve_settings(names: str | Sequence[str] | None,
                     settings: Sequence[Setting] = SETTINGS) -> tuple[Setting, ...]:
  """The `Setting`s named (full names or SETTING_KEYS); None: all of `settings`."""
  if names is None:
    return tuple(settings)
  by_name = {s.name: s for s in settings}
  out = []
  for n in [names] if isinstance(names, str) else names:
    full = SETTING_KEYS.get(n, n)
    if full not in by_name:
      raise ValueError(f"setting must be one of {list(by_name)} or the short names "
                       f"{', '.join(k for k, v in SETTING_KEYS.items() if v in by_name)}, got {n!r}.")
    out.append(by_name[full])
  return tuple(out)


def disagreements(report: AuditReport, expected: str, settings: Sequence[Setting]
                  ) -> list[tuple[str, str, str]]:
  """[(setting, verdict, expected label)] for each setting of `settings` whose verdict is not
  `expected` (see `accepted`)."""
  out = []
  for s in settings:
    want = accepted(expected, s)
    r = report.result(s.name)
    if r.follows != want:
      out.append((s.name, r.verdict, want))
  return out


def assert_follows(obj: Any, expected: str, *, setting: str | Sequence[str] | None = None,
                   **kwargs) -> AuditReport:
  """Raises AssertionError (naming each setting that disagrees, with the audit table) unless the
  gradient follows `expected` in every setting checked.

  Args:
    obj: as for `audit`.
    expected: "reverse", "forward", "zero", "frozen_reverse", "frozen_forward",
      "frozen_reverse_old" or "frozen_forward_old" (see `accepted`).
    setting: the `Setting` name(s) (or SETTING_KEYS) to check; None (default): every setting the
      audit runs (`settings=` in kwargs, else all of SETTINGS).
    **kwargs: passed to `audit` (placement, credit, signature, aggregation, penalty_at, ...).
  """
  if expected not in EXPECTATIONS:
    raise ValueError(f"expected must be one of {', '.join(EXPECTATIONS)}, got {expected!r}.")
  checked = resolve_settings(setting, kwargs.get("settings", SETTINGS))
  report = audit(obj, **kwargs)
  bad = disagreements(report, expected, checked)
  if bad:
    lines = "\n".join(f"  {name}: the gradient {verdict}, not {want}" for name, verdict, want in bad)
    raise AssertionError(f"{report.name} does not follow {expected} in {len(bad)} of "
                         f"{len(checked)} settings:\n{lines}\n\n" + report.markdown())
  return report


def to_json(report: AuditReport) -> str:
  """The report as the JSON the command line's --json writes."""
  return json.dumps(report.to_json(), indent=1, ensure_ascii=False)


def table_cell(text: str) -> str:
  return text.replace("|", "\\|")


def terms_table(names: Sequence[str]) -> str:
  """Markdown table: what each kljax KL term's gradient follows, each in-reward term both ways its
  penalty can be computed (README.md's terms table and docs/kl_terms.md, written by
  experiments/audit_docs.py)."""
  rows = ["| `kljax.kl_term(...)` | on-policy coefficient c | one token, on-policy | one token, "
          "off-policy | sequence, per-token, on-policy | sequence, off-policy | value bias vs "
          "KL(π‖π_ref) |", "|---|---|---|---|---|---|---|"]
  for name in names:
    modes = PENALTY_AT if kl_term(name).placement == "reward" else (None,)
    for at in modes:
      r = audit(name, penalty_at=at)
      label = f"`{name}`" + (f" (penalty at {'rollout' if at == 'rollout' else 'current θ'})"
                             if at else "")
      rows.append(f"| {label} | {table_cell(r.coefficient['identified'].removeprefix('= '))} | "
                  + " | ".join(table_cell(r.settings[i].verdict) for i in range(4))
                  + f" | {r.value['relative_bias_rkl']:+.0%} |")
  return "\n".join(rows) + "\n"


