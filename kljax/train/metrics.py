"""Per-step metrics: JSONL (one object a step) and TensorBoard event files, on local disk or an
object store, and optionally Weights & Biases (`metrics.wandb`; `pip install 'kljax[wandb]'`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Mapping

from kljax import paths


class MetricsWriter:
  """Writes DIR/metrics.jsonl and DIR/tensorboard; a resumed run first drops rows past the
  restored step, so the file always holds one row per completed step.

  Local DIR: every row is appended and flushed as it is written. A partial last line (a run
  stopped while appending it) is cut off with a notice. The file is rewritten through a temporary
  file and a rename, so a stop during the rewrite loses nothing.

  Object store (DIR = gs://…, which has no appends: gcsfs would silently overwrite): the rows are
  kept in memory and TensorBoard writes to a local temporary directory; `sync` uploads
  metrics.jsonl whole, as one object write (atomic: a reader sees the previous file or the new
  one, never a part), then the event files. The trainer calls `sync` before each checkpoint save
  begins and at the end (`close`), so the metrics on storage hold a row for every step before the
  newest checkpoint; rows past it (a run stopped before that save finished) are dropped when the
  run resumes, as on local disk. Between checkpoints, the rows written since the last one live
  only in the process: a killed run recomputes them, identically, when it resumes.

  TensorBoard event files are never appended to across starts (each start writes a new file).

  Weights & Biases (`wandb_project` set): every row is also logged to a W&B run whose id is a
  function of DIR, so that a resumed run continues the same W&B run. `wandb_mode="offline"` (the
  default) needs no network or account: the run's files go to DIR/wandb (a local DIR; wandb's own
  ./wandb otherwise), and `wandb sync DIR/wandb/offline-run-*` uploads them later. Needs the wandb
  package (`require_wandb`)."""

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0,
               tensorboard: bool = True, wandb_project: str | None = None,
               wandb_mode: str = "offline", run_config: Mapping | None = None):
    self.workdir = paths.resolve(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._local = paths.is_local(self.workdir)
    if self._local:
      self.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    if self.path.exists():
      rows, torn = _parse(self.path.read_text(), self.path)
      if torn:
        print(f"kljax: {self.path}: cut off a partial last line ({len(torn)} characters, "
              f"{torn[:40]!r}…), left by a run stopped while writing it.", file=sys.stderr,
              flush=True)
      rows = [row for row in rows if row["step"] <= resume_step]
      paths.write_atomic(self.path, _lines(rows))
    self._rows = [] if self._local else rows  # object store: every row, uploaded whole
    self._file = open(self.path, "a") if self._local else None
    self._tb = self._tb_local = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      tb_dir = self.workdir / "tensorboard"
      if not self._local:  # written here, uploaded by `sync`
        self._tb_local = paths.resolve(tempfile.mkdtemp(prefix="kljax-tensorboard-"))
      self._tb = SummaryWriter(os.fspath(self._tb_local or tb_dir))
    self._wandb = None
    if wandb_project is not None:
      self._wandb = _wandb_run(self.workdir, self._local, project=wandb_project, mode=wandb_mode,
                               run_config=run_config)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._file is not None and not self.path.exists():
      # Deleted while the run held it open: rows appended to the unlinked file would vanish
      # with it, and a rerun would find no metrics at all. Recreated, and the loss named.
      self._file.close()
      self._file = open(self.path, "a")
      print(f"kljax: {self.path} was deleted during the run: the rows of the steps before {step} "
            f"are lost (rerun in a new --workdir to have them); writing from step {step} on.",
            file=sys.stderr, flush=True)
    if self._file is not None:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    else:
      self._rows.append(row)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

  def sync(self) -> None:
    """Object store: uploads metrics.jsonl (one atomic object write) and the TensorBoard event
    files as they are now. Local: nothing to do (every row is already on disk)."""
    if self._local:
      return
    paths.write_atomic(self.path, _lines(self._rows))
    if self._tb is not None:
      self._tb.flush()
      for rel, p in paths.files_under(self._tb_local):
        paths.write_atomic(self.workdir / "tensorboard" / rel, p.read_bytes())

  def close(self) -> None:
    """Closes the files; on an object store, uploads what was written since the last `sync`."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
    if not self._local:
      try:
        self.sync()
      finally:
        if self._tb_local is not None:
          shutil.rmtree(self._tb_local, ignore_errors=True)


WANDB_MODES = ("offline", "online")
WANDB_MISSING = ("Weights & Biases logging (metrics.wandb) needs the wandb package, which is not "
                 "installed: pip install 'kljax[wandb]' (or pip install wandb), or set "
                 "--config.metrics.wandb=False.")


def require_wandb():
  """The wandb module; ValueError naming the extra when it is not installed."""
  try:
    import wandb
  except ImportError:
    raise ValueError(WANDB_MISSING) from None
  return wandb


def _wandb_run(workdir, local: bool, *, project: str, mode: str, run_config: Mapping | None):
  if mode not in WANDB_MODES:
    raise ValueError(f"wandb_mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}.")
  wandb = require_wandb()
  run_id = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]  # one W&B run per DIR
  return wandb.init(
      project=project, mode=mode, id=run_id, resume="allow", name=workdir.name,
      dir=os.fspath(workdir) if local else None, config=dict(run_config or {}),
      settings=wandb.Settings(silent=True, x_disable_stats=True, save_code=False))


def _lines(rows: list[dict]) -> str:
  return "".join(json.dumps(row) + "\n" for row in rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The rows of a JSONL file (local or a URL); a partial last line (a write in progress, or torn
  by a stop) is skipped."""
  path = paths.resolve(path)
  return _parse(path.read_text(), path)[0]


def _parse(text: str, path) -> tuple[list[dict], str]:
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


def window_means(rows: list[dict], key: str, *, fraction: float = 0.1
                 ) -> tuple[tuple[int, int, float], tuple[int, int, float]] | None:
  """((first_step, last_step, mean), …) of `key` over the first and the last `fraction` of `rows`
  (at least one row each; non-finite values skipped): a start-to-end comparison that a single noisy
  step cannot swing. None when no row has a finite `key`."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
  rows = [r for r in rows if key in r and math.isfinite(r[key])]
  if not rows:
    return None
  n = max(1, round(len(rows) * fraction))

  def mean(part):
    return part[0]["step"], part[-1]["step"], sum(r[key] for r in part) / len(part)

  return mean(rows[:n]), mean(rows[-n:])


def summary(rows: list[dict], *, fraction: float = 0.1) -> str:
  """One line comparing the first and last `fraction` of a GRPO run's steps: the reward's means and
  the exact KL(π‖π_ref) at the end, e.g.
  "reward 0.212 (mean of steps 0–29) -> 0.412 (steps 270–299); exact KL(π‖π_ref) 0.0031 (steps
  270–299)"."""
  span = lambda a, b: f"step {a}" if a == b else f"steps {a}–{b}"
  parts = []
  reward = window_means(rows, "reward_mean", fraction=fraction)
  if reward is not None:
    (a0, b0, r0), (a1, b1, r1) = reward
    parts.append(f"reward {r0:.3f} (mean of {span(a0, b0)}) -> {r1:.3f} (mean of {span(a1, b1)})")
  kl = window_means(rows, "exact_rkl", fraction=fraction)
  if kl is not None:
    _, (a1, b1, k1) = kl
    parts.append(f"exact KL(π‖π_ref) {k1:.4f} (mean of {span(a1, b1)})")
  return "; ".join(parts)
