"""Host <-> devices for the trainer.

Every process computes the same host-side batch (data order and keys are functions of the step),
so placing it is a slice per local device, and results come back to every host by allgather.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_devices(x, sharding_):
  """A global array with `sharding_` from a host value that every process holds in full (an array
  already placed that way is kept as it is, not copied: a large warm start is not held twice)."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding_, x.ndim):
    # Relabelled as `sharding_` (no copy): the jitted update returns NamedShardings, and a
    # function's compilation cache keys on the sharding, so an array placed the same way but
    # labelled otherwise (one device: SingleDeviceSharding) would compile every program twice.
    return x if x.sharding == sharding_ else jax.device_put(x, sharding_)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def tree_to_devices(tree, shardings):
  """`to_devices` over a pytree; `shardings` may be a prefix of it (one sharding per Variable)."""
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: to_devices(x, s), sub), shardings, tree)


def replicate(tree, mesh):
  """Every leaf not already spread over the whole mesh, replicated over it (optimizer counters,
  β, the step): multi-process checkpoints need global arrays."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == mesh.size:
      return to_devices(x, rep) if x.sharding.is_fully_replicated else x
    return to_devices(to_host(x), rep)

  return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
  """The full value of a (possibly multi-process) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)

