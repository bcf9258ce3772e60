"""Orbax checkpoints of a whole training state, with errors that say what is wrong."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run (corrupt, or from another configuration)."""


class Checkpointer:
  """Saves every `every` steps into DIR/checkpoints, keeps the last `keep`, restores the latest."""

  def __init__(self, workdir: str, *, every: int, keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint_every must be >= 1, got {every}.")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self._manager.wait_until_finished()
    return True

  def restore(self, target: Any) -> tuple[int, Any] | None:
    """(step, state) of the latest checkpoint restored into `target`'s structure, or None."""
    step = self.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # noqa: BLE001 - orbax raises many types; name the cause plainly
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: {type(err).__name__}: "
          f"{str(err)[:300]}. It is corrupt or was written by a different configuration (model "
          f"preset, optimizer); use a fresh --workdir or delete that checkpoint."
      ) from None
    return step, state

  def close(self) -> None:
    self._manager.close()
