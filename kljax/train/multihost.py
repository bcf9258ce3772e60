"""Ordering work across the processes of a multi-host run."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np


class LeaderFailedError(RuntimeError):
  """Process 0 failed in a block the other processes were waiting for."""


@contextlib.contextmanager
def leader_first(what: str) -> Iterator[None]:
  """Runs the `with` block on process 0 first, then, once it succeeded, on every other process at
  once: process 0 prepares what all share (a dataset, the warm start) and the others then find it
  ready instead of racing to write the same files. A barrier, so every process must enter.

  If the block raises on process 0, the others raise LeaderFailedError naming `what` (process 0
  raises its own error) instead of waiting forever. A single process just runs the block."""
  if jax.process_count() == 1:
    yield
    return
  from jax.experimental import multihost_utils

  def agree(ok: bool) -> bool:  # process 0's verdict, on every process
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

  if jax.process_index() == 0:
    try:
      yield
    except BaseException:
      agree(False)
      raise
    agree(True)
  else:
    if not agree(True):
      raise LeaderFailedError(f"process 0 failed {what}; its output names the cause.")
    yield
