"""Curves of one or several runs: one PNG per metric group, one line per run.

  python -m experiments.plot --runs DIR1,DIR2[,...] --out plots/ [--smooth 10]

Reads each DIR/metrics.jsonl; a run is labelled by its directory name. DIRs and --out may be local
or URLs (gs://BUCKET/…).
"""

from __future__ import annotations

import os

from absl import app, flags

from kljax import cli
from kljax import paths as paths_lib
from kljax.train.metrics import read_jsonl

_RUNS = flags.DEFINE_list("runs", None, "Run directories (each with metrics.jsonl).")
_OUT = flags.DEFINE_string("out", "plots", "Directory for the PNGs.")
_SMOOTH = flags.DEFINE_integer("smooth", 1, "Moving-average window (steps).")
flags.mark_flag_as_required("runs")

GROUPS = {
    "reward": ["reward_mean", "accuracy", "reward_std"],
    "kl": ["exact_rkl", "exact_fkl", "k3"],
    "policy": ["entropy", "length_mean", "clip_fraction"],
    "optimization": ["loss", "grad_norm", "update_norm"],
}


def _smooth(values, window):
  import numpy as np

  v = np.asarray(values, float)
  if window <= 1 or len(v) < window:
    return v
  return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_runs(runs: dict[str, list[dict]], out: str, smooth: int = 1) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = paths_lib.resolve(out)
  paths = []
  for group, metrics in GROUPS.items():
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
      for name, rows in runs.items():
        rows = [r for r in rows if metric in r]
        if rows:
          y = _smooth([r[metric] for r in rows], smooth)
          ax.plot([r["step"] for r in rows][len(rows) - len(y):], y, label=name, lw=1.3)
      ax.set_title(metric)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{group}.png"
    paths_lib.save_figure(fig, path, dpi=100)
    plt.close(fig)
    paths.append(os.fspath(path))
  return paths


def main(argv):
  del argv
  runs = {}
  for d in _RUNS.value:
    try:
      paths_lib.check_reachable(d, flag="--runs")
    except paths_lib.PathError as err:
      raise app.UsageError(str(err)) from None
    path = paths_lib.resolve(d) / "metrics.jsonl"
    if not path.exists():
      raise app.UsageError(f"--runs: {path} does not exist.")
    runs[path.parent.name] = read_jsonl(path)
  for p in plot_runs(runs, _OUT.value, _SMOOTH.value):
    print(p)


if __name__ == "__main__":
  cli.run(main)
