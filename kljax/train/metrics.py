"""Per-step metrics: JSONL (one object a step) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping


class MetricsWriter:
  """Appends to DIR/metrics.jsonl and DIR/tensorboard; a resumed run first drops lines past the
  restored step, so the file always holds one line per completed step.

  A partial last line (a run stopped while appending it) is cut off with a notice. The file is
  rewritten through a temporary file and a rename, so a stop during the rewrite loses nothing.
  TensorBoard event files are never appended to across starts (each start writes a new file)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows, torn = _parse(f.read(), self.path)
      if torn:
        print(f"kljax: {self.path}: cut off a partial last line ({len(torn)} characters, "
              f"{torn[:40]!r}…), left by a run stopped while writing it.", file=sys.stderr,
              flush=True)
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= resume_step)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSONL file; a partial last line (a write in progress, or torn by a stop) is
  skipped."""
  with open(path) as f:
    return _parse(f.read(), path)[0]


def _parse(text: str, path: str) -> tuple[list[dict], str]:
  """(rows, torn): the complete lines' objects and a partial last line ('' if none). A line other
  than the last that is not JSON was not torn by a stop: ValueError naming it."""
  lines = text.split("\n")
  rows, torn = [], ""
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise ValueError(f"{path}, line {i + 1}: not JSON ({line[:60]!r}); the file was edited or "
                         f"damaged, not torn by a stop; fix or remove that line.") from None
      torn = line
  return rows, torn
