"""What the audit measures besides the gradient's target: the on-policy coefficient c(log δ) on a
grid, the exact bias and spread of the value as a KL estimate, and the numerics at extreme log δ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kljax import estimators as est
from kljax import gradient_table
from kljax.audit.implementations import Implementation


COEFFICIENT_GRID = tuple(float(x) for x in np.linspace(-10.0, 10.0, 81))
_KNOWN = {  # c − c(0) as a function of log δ: the on-policy coefficients with a name
    "log π − log π_ref (∇RKL)": lambda ld: -ld,
    "1 − δ (∇FKL)": lambda ld: 1.0 - np.exp(ld),
    "constant (zero expected gradient)": lambda ld: np.zeros_like(ld),
}


def _probe_logps(log_delta: np.ndarray, dtype):
  """Valid log-prob pairs (both ≤ −1) with ref_logp − logp = log δ."""
  ld = np.asarray(log_delta, np.float64)
  logp = -1.0 - np.maximum(ld, 0.0)
  ref = -1.0 + np.minimum(ld, 0.0)
  return jnp.asarray(logp, dtype)[:, None], jnp.asarray(ref, dtype)[:, None]


def coefficients(impl: Implementation, log_delta, dtype=jnp.float32):
  """On-policy one-token coefficient c = ∂surrogate/∂logp, and the value, on a log δ grid."""
  lp, lq = _probe_logps(log_delta, dtype)
  mask = jnp.ones(lp.shape, jnp.float32)

  def total(x):
    return jnp.sum(impl.surrogate(x, lq, None, mask).astype(jnp.float32))

  c = jax.grad(total)(lp)[:, 0].astype(jnp.float32)
  value = impl.value(lp, lq)[:, 0].astype(jnp.float32)
  return np.asarray(c, np.float64), np.asarray(value, np.float64)


def identify(log_delta: np.ndarray, c: np.ndarray) -> dict[str, Any]:
  """Matches c(log δ) − c(0) against a positive multiple of each known form on |log δ| ≤ 2 (where
  no reasonable clamp acts). A constant shift changes nothing in expectation: E[∇logp] = 0."""
  zero = int(np.argmin(np.abs(log_delta)))
  shifted = c - c[zero]
  core = np.abs(log_delta) <= 2.0
  scale = max(float(np.max(np.abs(c[core]))), 1e-12)
  errors, factors = {}, {}
  for k, f in _KNOWN.items():
    ref = f(log_delta[core])
    a = max(float(shifted[core] @ ref) / float(ref @ ref), 0.0) if np.any(ref) else 0.0
    errors[k] = float(np.max(np.abs(shifted[core] - a * ref))) / scale
    factors[k] = a
  constant = "constant (zero expected gradient)"
  best = constant if errors[constant] <= 1e-4 else min(errors, key=errors.get)
  if errors[best] <= 1e-4:
    label = best if best.startswith("constant") or abs(factors[best] - 1) <= 1e-4 else (
        f"{factors[best]:.3g} × ({best.replace(' (', ') (', 1)}")
    const = c[zero]
    identified = "= " + (label if abs(const) < 1e-6 or best == constant
                         else f"{const:.3g} + {label}")
  else:
    identified = f"matches none of the known forms (nearest: {best}, max error {errors[best]:.2g})"
  return {"grid": [float(x) for x in log_delta], "values": [float(x) for x in c],
          "errors": errors, "identified": identified}


def robustness(impl: Implementation) -> dict[str, Any]:
  grid = np.round(np.arange(-100.0, 100.0 + 1e-9, 0.5), 6)
  out: dict[str, Any] = {}
  for dtype, label in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")):
    c, v = coefficients(impl, grid, dtype)
    bad_v, bad_c = ~np.isfinite(v), ~np.isfinite(c)
    out[label] = {"nonfinite_value": int(bad_v.sum()), "nonfinite_grad": int(bad_c.sum()),
                  "nonfinite_at": [float(x) for x in grid[bad_v | bad_c]][:6]}
    if label == "float32":
      out["zeroed"] = _zeroed(grid, c)
  return out


def _zeroed(grid: np.ndarray, c: np.ndarray, *, run: int = 3) -> dict[str, float | None]:
  """Per side of log δ = 0: where a gradient that is finite and non-zero nearer to 0 becomes exactly
  0 for `run` grid points in a row (a clamp's silent zero; an isolated root of c is not one)."""
  out = {}
  for side, order in (("above", np.where(grid > 0)[0]), ("below", np.where(grid < 0)[0][::-1])):
    seen_nonzero, at = False, None
    for j, i in enumerate(order):
      if np.isfinite(c[i]) and c[i] != 0:
        seen_nonzero = True
      elif seen_nonzero and c[i] == 0 and np.all(c[order[j:j + run]] == 0):
        at = float(grid[i])
        break
    out[side] = at
  return out


def robustness_summary(r: dict[str, Any]) -> str:
  parts = []
  for dtype in ("float32", "bfloat16"):
    d = r[dtype]
    if d["nonfinite_value"] or d["nonfinite_grad"]:
      parts.append(f"{dtype}: non-finite value at {d['nonfinite_value']} and gradient at "
                   f"{d['nonfinite_grad']} of 401 log δ (e.g. {d['nonfinite_at'][:3]})")
  z = r["zeroed"]
  if z["above"] is not None:
    parts.append(f"gradient silently 0 for log δ ≥ {z['above']:g}")
  if z["below"] is not None:
    parts.append(f"gradient silently 0 for log δ ≤ {z['below']:g}")
  return "; ".join(parts) if parts else "finite in float32 and bfloat16, no gradient cut to 0"


def value_stats(impl: Implementation, seeds: int) -> dict[str, float]:
  rb, fb, sd = [], [], []
  for seed in range(seeds):
    policy, ref, _ = gradient_table.policies(gradient_table.AUDIT_SETTINGS[0], seed)
    lp = jax.nn.log_softmax(policy[0])
    lq = jax.nn.log_softmax(ref[0])
    p = np.exp(np.asarray(lp, np.float64))
    v = np.asarray(impl.value(lp[:, None], lq[:, None])[:, 0], np.float64)
    lp64, lq64 = np.asarray(lp, np.float64), np.asarray(lq, np.float64)
    rkl, fkl = float(est.kl_from_log_probs(lp64, lq64)), float(est.kl_from_log_probs(lq64, lp64))
    mean = float(np.sum(p * v))
    rb.append((mean - rkl) / rkl)
    fb.append((mean - fkl) / fkl)
    sd.append(float(np.sqrt(max(np.sum(p * v * v) - mean**2, 0.0))) / rkl)
  return {"relative_bias_rkl": float(np.mean(rb)), "relative_bias_fkl": float(np.mean(fb)),
          "relative_std_rkl": float(np.mean(sd))}

