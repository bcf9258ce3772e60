"""What verified checkpoints cost: kljax's Checkpointer against orbax alone, on a GRPO state.

  python benchmarks/checkpoint.py                  # presets tiny and 20m, 3 runs of 15 repetitions
  python benchmarks/checkpoint.py --json benchmarks/results/checkpoint.json   # docs/operations.md
  python benchmarks/checkpoint.py --quick

The state is what a GRPO run saves: policy and reference parameters, AdamW moments, β and the
step (≈ 4 × the parameter bytes). Both sides use an asynchronous orbax `CheckpointManager` with
the same options; kljax adds the digest item (CRC-32 of every array, computed in orbax's
background commit) and, on restore, recomputes and compares it. Reported: median seconds of each
side, and the median of the per-repetition ratios kljax/orbax, for each run (the range over runs
is what one machine's noise allows); and the digest's own time (`tree_digest` of the state).

  stall    the time `save` blocks the training loop (the rest is written in the background)
  save     until the checkpoint is on disk (`wait_until_finished`)
  restore  until the restored arrays are ready (kljax: also verified)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from kljax import models
from kljax.train.checkpoint import Checkpointer, tree_digest


KINDS = ("stall", "save", "restore")


def grpo_state(preset: str) -> dict:
  _, params = nnx.split(models.create(models.preset(preset), seed=0))
  ref = jax.tree.map(lambda x: x * 1, params)  # distinct arrays, as after the first update
  return {"params": params, "ref_params": ref, "opt_state": optax.adamw(1e-3).init(params),
          "beta": jnp.float32(0.05), "step": jnp.int32(0)}


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


class _Orbax:
  """Orbax alone, with the Checkpointer's options."""

  def __init__(self, directory: str):
    self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=True))

  def save(self, step, state):
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def wait(self):
    self.manager.wait_until_finished()

  def restore(self, state):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return self.manager.restore(self.manager.latest_step(),
                                args=ocp.args.StandardRestore(abstract))


class _Kljax:
  def __init__(self, directory: str):
    self.ckpt = Checkpointer(directory, every=1)

  def save(self, step, state):
    self.ckpt.maybe_save(step, state)

  def wait(self):
    self.ckpt.wait()

  def restore(self, state):
    return self.ckpt.restore(state).state


def bench(state, directory: str, reps: int) -> dict[str, dict[str, list[float]]]:
  """Wall and CPU seconds (user + system, every thread of the process) of each side, repetition
  by repetition; the sides alternate within each repetition, so that a change in the machine's
  load falls on both."""
  sides = {"orbax": _Orbax(os.path.join(directory, "orbax")),
           "kljax": _Kljax(os.path.join(directory, "kljax"))}
  times = {name: {k: [] for k in KINDS + tuple(f"{k}_cpu" for k in KINDS)} for name in sides}
  clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
  for step in range(1, reps + 2):  # the first repetition warms up
    for name, side in sides.items():
      t0 = clock()
      side.save(step, state)
      t1 = clock()
      side.wait()
      t2 = clock()
      jax.block_until_ready(side.restore(state))
      t3 = clock()
      if step > 1:
        for k, (a, b) in zip(KINDS, ((t0, t1), (t0, t2), (t2, t3))):
          times[name][k].append(b[0] - a[0])
          times[name][f"{k}_cpu"].append(b[1] - a[1])
  return times


def summary(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
  """{stall|save|restore: {orbax, kljax: median wall seconds, ratio: median of paired ratios,
  orbax_cpu, kljax_cpu: median CPU seconds}}."""
  base, ours = times["orbax"], times["kljax"]
  return {k: {"orbax": statistics.median(base[k]), "kljax": statistics.median(ours[k]),
              "ratio": statistics.median(b / a for a, b in zip(base[k], ours[k])),  # paired
              "orbax_cpu": statistics.median(base[f"{k}_cpu"]),
              "kljax_cpu": statistics.median(ours[f"{k}_cpu"])}
          for k in KINDS}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="tiny,20m")
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--runs", type=int, default=3, help="independent runs of --reps repetitions")
  p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
  p.add_argument("--json", default=None, help="write the figures here (docs/operations.md's table)")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.presets, args.reps, args.runs = "tiny", 2, 1

  out = {"command": " ".join(["python", "benchmarks/checkpoint.py"] + sys.argv[1:]),
         "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "reps": args.reps,
         "presets": {}}
  print(f"{'preset':8} {'MB':>7} run {'':8} {'orbax s':>8} {'kljax s':>8} {'kljax/orbax':>11} "
        f"{'CPU s: orbax':>12} {'kljax':>6}")
  for preset in args.presets.split(","):
    state = grpo_state(preset)
    mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    runs = []
    for run in range(args.runs):
      with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        runs.append(summary(bench(state, tmp, args.reps)))
      for i, (k, r) in enumerate(runs[-1].items()):
        print(f"{preset if not (i or run) else '':8} {f'{mb:.1f}' if not (i or run) else '':>7} "
              f"{run + 1 if not i else '':>3} {k:8} {r['orbax']:8.3f} {r['kljax']:8.3f} "
              f"{r['ratio']:10.2f}x {r['orbax_cpu']:12.3f} {r['kljax_cpu']:6.3f}", flush=True)
    digest = statistics.median(_time(lambda: tree_digest(state)) for _ in range(max(3, args.reps)))
    print(f"{'':8} {'':>7}     digest   {digest:8.3f} s (tree_digest of the state)")
    out["presets"][preset] = {"mb": mb, "runs": runs, "digest_s": digest}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
