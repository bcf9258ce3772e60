"""Trace-time argument checks shared by the public functions.

Every check here reads only shapes and dtypes (static under `jax.jit`), so it costs nothing at run
time, except `check_distribution`, which reads values and is meant for the eager oracle API.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def as_float(x: ArrayLike, name: str) -> jax.Array:
  """Returns `x` as a floating JAX array; raises TypeError for integer, bool or complex input."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array (log-probabilities), got dtype {x.dtype}."
    )
  return x


def as_float32(x: ArrayLike, name: str) -> jax.Array:
  """`as_float`, then upcast to at least float32 (float64 stays float64)."""
  x = as_float(x, name)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def same_shape(**arrays: jax.Array | None) -> None:
  """Raises ValueError unless all non-None arrays have one shape (no broadcasting)."""
  given = {k: v for k, v in arrays.items() if v is not None}
  shapes = {k: tuple(np.shape(v)) for k, v in given.items()}
  if len(set(shapes.values())) > 1:
    seen = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
    raise ValueError(f"expected arrays of one shape, got {seen}.")


def masked_series(values: ArrayLike, mask: ArrayLike | None, *, name: str,
                  mask_name: str) -> tuple[jax.Array, jax.Array | None]:
  """`values` as float32 with a time axis (the last), zeroed where `mask` is False, and the mask
  as an array (None stays None); ValueError naming `name`/`mask_name` on a scalar or a shape
  mismatch."""
  x = as_float32(values, name)
  if x.ndim < 1:
    raise ValueError(f"{name} must have a time axis (the last), got shape {list(x.shape)}.")
  if mask is not None:
    mask = jnp.asarray(mask)
    same_shape(**{name: x, mask_name: mask})
    x = jnp.where(mask.astype(bool), x, 0.0)
  return x, mask


def positive(value: float, name: str, *, allow_zero: bool = False) -> float:
  """Raises ValueError unless `value` is a finite number > 0 (>= 0 with allow_zero)."""
  v = float(value)
  ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
  if not ok:
    expected = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a finite number {expected}, got {value!r}.")
  return v


def open_unit(value: float, name: str) -> float:
  """Raises ValueError unless 0 < value < 1."""
  v = float(value)
  if not (0.0 < v < 1.0):
    raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}.")
  return v


def check_distribution(p: ArrayLike, name: str, *, atol: float = 1e-4) -> jax.Array:
  """Returns `p` as a float array after checking it is a probability vector over its last axis.

  Reads values, so it must be called on concrete arrays (the oracle's eager entry points); under a
  trace it only checks the dtype.
  """
  p = as_float(p, name)
  if isinstance(p, jax.core.Tracer):
    return p
  a = np.asarray(p, dtype=np.float64)
  if a.ndim == 0:
    raise ValueError(f"{name} must have at least one axis (the outcomes), got a scalar.")
  if not np.all(np.isfinite(a)) or np.any(a < 0):
    raise ValueError(f"{name} must be non-negative and finite, got min {np.nanmin(a):.3g}.")
  sums = a.sum(axis=-1)
  worst = float(np.max(np.abs(sums - 1.0)))
  if worst > atol:
    raise ValueError(
        f"{name} must sum to 1 over its last axis (a normalized distribution); "
        f"a sum of {float(sums.flat[np.argmax(np.abs(sums - 1.0))]):.6g} was seen."
    )
  return p
