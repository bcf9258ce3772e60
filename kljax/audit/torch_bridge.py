"""PyTorch KL functions made auditable: values and derivatives from torch autograd.

torch is imported when `from_torch` is called, not with `kljax.audit`: it is an optional, heavy
dependency that only audits of PyTorch code need.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from kljax.audit.implementations import AuditError


def from_torch(fn: Callable, *, signature: Literal["elementwise", "sequence"] = "elementwise"
               ) -> Callable:
  """A JAX-callable wrapper of a PyTorch KL function, for `elementwise` or `sequence`.

  Values and vector-Jacobian products are computed by torch (autograd) on CPU through
  `jax.pure_callback`, in the input's dtype (bfloat16 stays bfloat16 in torch), so what is
  audited is the exact code the framework runs. torch is imported here only.
  """
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is a test dependency
    raise ImportError("kljax.audit.from_torch needs PyTorch: pip install torch") from e
  arity = 2 if signature == "elementwise" else 4
  if signature not in ("elementwise", "sequence"):
    raise ValueError(f"signature must be 'elementwise' or 'sequence', got {signature!r}.")

  def to_torch(x, dtype):
    t = torch.from_numpy(np.asarray(x, np.float32).copy())
    return t.to(torch.bfloat16) if dtype == jnp.bfloat16 else t

  def run(args, dtype, cotangent=None):
    ts = [to_torch(a, dtype).requires_grad_(i < 3) for i, a in enumerate(args)]
    out = fn(*ts)
    if not isinstance(out, torch.Tensor):
      raise AuditError(f"the torch function returned {type(out).__name__}, expected a tensor.")
    if cotangent is None:
      return np.asarray(out.detach().float().numpy(), np.float32)
    grads = torch.autograd.grad(out, ts[:min(3, arity)], grad_outputs=to_torch(cotangent, dtype)
                                .to(out.dtype), allow_unused=True)
    return tuple(np.zeros(np.shape(a), np.float32) if g is None else
                 np.asarray(g.float().numpy(), np.float32) for a, g in zip(args, grads))

  def host_forward(*args):
    dtype = args[0].dtype
    return jax.pure_callback(lambda *a: run(a, dtype).astype(dtype),
                             jax.ShapeDtypeStruct(args[0].shape, dtype), *args)

  @jax.custom_vjp
  def wrapped(*args):
    return host_forward(*args)

  def fwd(*args):
    return host_forward(*args), args

  def bwd(args, cotangent):
    dtype = args[0].dtype
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, dtype) for a in args[:min(3, arity)])
    grads = jax.pure_callback(
        lambda c, *a: tuple(g.astype(dtype) for g in run(a, dtype, c)), shapes, cotangent, *args)
    return tuple(grads) + tuple(jnp.zeros_like(a) for a in args[len(grads):])

  wrapped.defvjp(fwd, bwd)

  @functools.wraps(fn)
  def call(*args):
    if len(args) != arity:
      raise AuditError(f"{signature} torch functions take {arity} arrays, got {len(args)}.")
    dtype = jnp.result_type(args[0])
    return wrapped(*(jnp.asarray(a, dtype) for a in args))

  return call
