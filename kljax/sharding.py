"""Meshes, logical-axis rules, and placement of parameters and batches.

One code path from 1 CPU device to a TPU pod: a `jax.make_mesh` mesh with named axes
(`data`, `fsdp`, `tensor`), parameters that carry logical axis names (see `kljax.models`), and a rules
table mapping each logical name to mesh axes. A mesh axis is used for an array dimension only when
it divides that dimension, so any preset runs on any mesh.

When it does not divide, what happens depends on the axis's role:

* Compute axes (`tensor`) lay out the matmuls themselves (Megatron column/row splits), so moving
  them to another dimension would change the computation's partitioning: the dimension is
  replicated over them (e.g. 2 KV heads on a tensor axis of 4).
* Storage axes (`STORAGE_AXES`: `fsdp`) only decide where a weight lives between uses: FSDP
  gathers it before the matmul, so any dimension serves equally well. Such an axis falls back to
  the array's largest other dimension that it divides (never `layers`, which the layer scan slices
  one entry at a time; never a dimension with no rule). E.g. qwen2.5-0.5b on fsdp=256: the MLP
  weights [L, 896, 4864] shard 4864 = 256·19 instead of the 896-wide embed dimension.
* A dimension with no factor that the axis divides (151,936 = 2⁷·1187 over 256) still replicates.
  For the vocabulary, `ModelConfig.vocab_multiple` pads the embedding's rows to a multiple (as
  MaxText does: 151,936 → 152,064 = 256·594); the padded rows are never read (the unembedding
  is sliced back to the real vocabulary, so the padded logits do not exist). Where no dimension of
  an array divides the storage axis (qwen2.5-0.5b's attention weights [24, 896, 14, 64] on 256),
  use a mesh whose fsdp axis does (data 2 × fsdp 128); `experiments.plan` lists what stays
  replicated.

Which dimension of the embedding `fsdp` takes (its vocabulary rows, or the embedding dimension as
every other weight) depends on the update's size: `rules_for` picks `DEFAULT_RULES` or
`EMBED_FIRST_RULES`, and the trainer and the planner both ask it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that only place weights between uses (see the module docstring): they may fall back to
# another dimension of the array when their rule's dimension is not divisible.
STORAGE_AXES = ("fsdp",)
# Logical dimensions a storage axis never falls back to: the layer scan slices `layers` per step.
_NO_FALLBACK = ("layers",)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical axis -> mesh axes, applied in this order (an axis claimed by an earlier rule is not
# used again in the same array). Batch over data and fsdp (FSDP shards params *and* batch); model
# dimensions in the Megatron pattern over tensor; the embedding dimension over fsdp (ZeRO-3),
# except in the embedding and unembedding, whose vocabulary dimension takes fsdp first: there XLA
# then gathers the few tokens' activations [N, D] for the logits matmul and keeps the logits split
# over the vocabulary, where an embed-split table made every device hold the whole vocabulary-sized
# weight, its gradient and their float32 copies (qwen2.5-0.5b, fsdp=8, 1 layer, 8 sequences of 12
# tokens: 2.92 GiB of update temporaries per device before, 0.18 GiB after: XLA:CPU's figures from
# benchmarks/vocab_sharding.py). For large updates the trade reverses (`rules_for` chooses).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
)

# The same rules with the vocabulary off `fsdp` (the table's rows split over `embed`, ZeRO-3 style).
EMBED_FIRST_RULES: Rules = tuple((k, "tensor") if k == "vocab" else (k, v) for k, v in DEFAULT_RULES)
# An update of fewer tokens than vocabulary rows / VOCAB_FIRST_FACTOR takes the vocabulary-first
# rules. The two splits trade the gather of the table [V, D] (embed-first: every device holds the
# whole table, its gradient and float32 copies for the logits matmul) against the gather of the
# update's activations [N, D] (vocabulary-first). Measured with `experiments.plan` on the README
# table's 16 (preset × mesh) rows under each rule set: vocabulary-first was smaller at 12k tokens an
# update (8 devices) and at the real-shape run's 384 tokens (2.92 → 0.18 GiB of temporaries), and
# larger from 49k tokens up in 7 of the 8 rows that differ (at 393k tokens, qwen2.5-7b on 256
# devices: 20.89 vs 5.62 GiB peak). 8 puts the switch between 12k and 49k for a 152k vocabulary.
VOCAB_FIRST_FACTOR = 8


EMBEDDING_SPLITS = ("auto", "vocab", "embed")


def rules_for(tokens_per_update: int, vocab_size: int, split: str = "auto") -> Rules:
  """The rules for a model of `vocab_size` trained on updates of `tokens_per_update` tokens (all
  devices together). `split`: "vocab" (`DEFAULT_RULES`, the vocabulary rows on `fsdp` first),
  "embed" (`EMBED_FIRST_RULES`), or "auto": "vocab" for small updates, "embed" for large ones
  (see `VOCAB_FIRST_FACTOR`). The rule reads the update alone; where the sampler sets the peak,
  `experiments.plan --embedding_split` compares both."""
  if split not in EMBEDDING_SPLITS:
    raise ValueError(f"embedding split must be one of {', '.join(EMBEDDING_SPLITS)}, got {split!r}.")
  if tokens_per_update < 1 or vocab_size < 1:
    raise ValueError(f"tokens_per_update and vocab_size must be >= 1, got {tokens_per_update} and "
                     f"{vocab_size}.")
  if split == "auto":
    split = "vocab" if tokens_per_update * VOCAB_FIRST_FACTOR <= vocab_size else "embed"
  return DEFAULT_RULES if split == "vocab" else EMBED_FIRST_RULES


def make_mesh(
    *, data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 (all remaining devices).

  Raises ValueError, before anything is compiled, when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh sizes must be positive, with at most one -1; got {sizes}.")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % known:
      raise ValueError(
          f"mesh {sizes}: {len(devices)} devices are not divisible by the fixed axes' product {known}."
      )
    sizes[free[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(
        f"mesh data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} = "
        f"{math.prod(sizes.values())} does not match the {len(devices)} available devices; "
        f"change the mesh sizes (or set one of them to -1)."
    )
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for name, axes in rules:
    table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return table


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry `logical` names.

  Dimensions take their mesh axes in the order of the rules table (`vocab` before `embed`); mesh
  axes of size 1 and axes already claimed by another dimension are dropped. An axis that does
  not divide its dimension is dropped too (that dimension is replicated over it), except a storage
  axis (`STORAGE_AXES`), which moves to the largest other dimension it divides (module docstring).
  """
  table = _rule_table(rules)
  for name in logical:
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}.")
  used: set[str] = set()
  chosen: list[list[str]] = [[] for _ in logical]
  misfits: list[str] = []
  order = {name: i for i, name in enumerate(table)}
  for i in sorted((i for i, name in enumerate(logical) if name is not None),
                  key=lambda i: order[logical[i]]):
    size, axes = shape[i], chosen[i]
    for axis in table[logical[i]]:
      n = mesh.shape[axis]
      if n == 1 or axis in used:
        continue
      if size % (math.prod(mesh.shape[a] for a in axes) * n):
        if axis in STORAGE_AXES:
          misfits.append(axis)
        continue
      axes.append(axis)
    used.update(axes)
  for axis in misfits:
    if axis in used:
      continue
    n = mesh.shape[axis]
    candidates = [i for i, (name, size) in enumerate(zip(logical, shape))
                  if name is not None and name not in _NO_FALLBACK
                  and size % (math.prod(mesh.shape[a] for a in chosen[i]) * n) == 0]
    if candidates:
      best = max(candidates, key=lambda i: shape[i])
      chosen[best].append(axis)
      used.add(axis)
  return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else tuple(a) for a in chosen))


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for every array of an NNX state, from its variables' logical axis names."""

  def one(var):
    names = getattr(var, "out_sharding", None) or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """Places a module's arrays on the mesh by the rules (in place); returns the module."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)
  values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(module, jax.device_put(values, shardings))
  return module


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES):
  """Sharding of a [B, ...] batch: the leading axis over the batch rule's mesh axes."""
  axes = tuple(a for a in _rule_table(rules)["batch"] if mesh.shape[a] > 1)
  first = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes that each device holds of a pytree of arrays (addressable shards only)."""
  out: dict[jax.Device, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
  return out


def check_divisible(batch_size: int, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> None:
  """Raises ValueError when the batch cannot be split over the mesh's batch axes."""
  n = int(np.prod([mesh.shape[a] for a in _rule_table(rules)["batch"]]))
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} must be divisible by the data×fsdp mesh size {n}.")


def constrain_batch(x: jax.Array, rules: Rules = DEFAULT_RULES) -> jax.Array:
  """Keeps an activation's leading (batch) axis sharded over the batch rule's mesh axes.

  Inside `jax.set_mesh(mesh)` this is a `with_sharding_constraint`; without a mesh (one device, or
  a caller that sets none) it returns `x` unchanged. Without it XLA may resolve the clash between
  FSDP-sharded weights (embed over `fsdp`) and the batch (also over `fsdp`) by sharding the matmul's
  contraction and replicating the activations, which multiplies activation memory by the mesh size.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in _rule_table(rules)["batch"] if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  first = axes[0] if len(axes) == 1 else axes
  return jax.lax.with_sharding_constraint(x, PartitionSpec(first, *([None] * (x.ndim - 1))))



def copy_tree(tree: Any) -> Any:
  """Every array of `tree` copied into buffers of its own, with the same shardings.

  For arrays that must outlive a jitted call which donates the originals (the trainer's update
  donates the policy and its optimizer state): the reset reference, the sampler's stale
  parameters.
  """
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
