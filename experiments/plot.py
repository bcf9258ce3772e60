"""Curves of one or several GRPO runs: one PNG per metric group, one line per run.

  python -m experiments.plot --runs DIR1,DIR2[,...] --out plots/ [--smooth 10] [--labels A,B]

Reads each DIR/metrics.jsonl. A run is labelled by its KL term and β: from DIR/config.json when the
run wrote one, else from --labels, else "<directory name>, β = <β of its metrics>". Panels whose
values never change (e.g. the length of fixed-length completions, the clip fraction of on-policy
runs) and an accuracy equal to the reward are left out. DIRs and --out may be local or URLs
(gs://BUCKET/…).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import figures
from kljax import cli
from kljax import paths as paths_lib
from kljax.train.metrics import read_jsonl

_RUNS = flags.DEFINE_list("runs", None, "Run directories (each with metrics.jsonl).")
_LABELS = flags.DEFINE_list("labels", None, "One label per run (default: KL term and β).")
_OUT = flags.DEFINE_string("out", "plots", "Directory for the PNGs.")
_SMOOTH = flags.DEFINE_integer("smooth", 1, "Moving-average window (steps).")
flags.mark_flag_as_required("runs")

GROUPS = {
    "reward": ["reward_mean", "accuracy", "reward_std"],
    "kl": ["exact_rkl", "exact_fkl", "k3"],
    "policy": ["entropy", "length_mean", "clip_fraction"],
    "optimization": ["loss", "grad_norm", "update_norm"],
}


def plot_runs(runs: dict[str, list[dict]], out: str, smooth: int = 1) -> list[str]:
  """One PNG per group of `GROUPS` that has a panel with information; returns their paths."""
  out = paths_lib.resolve(out)
  written = []
  for group, metrics in GROUPS.items():
    path = out / f"{group}.png"
    try:
      figures.grpo_curves({name: [rows] for name, rows in runs.items()}, path,
                          f"{group}: {len(runs)} run(s)", smooth=smooth, metrics=metrics)
    except ValueError:  # nothing in this group varies
      continue
    written.append(os.fspath(path))
  return written


def run_label(directory, rows: list[dict]) -> str:
  """"<KL term>, β = <β>" from DIR/config.json, else the directory name and the metrics' β."""
  config = paths_lib.resolve(directory) / "config.json"
  if config.exists():
    kl = json.loads(config.read_text()).get("kl", {})
    if "term" in kl and "beta" in kl:
      return f"{kl['term']}, β = {kl['beta']:g}"
  beta = {r["beta"] for r in rows if "beta" in r}
  name = paths_lib.resolve(directory).name
  return f"{name}, β = {beta.pop():g}" if len(beta) == 1 else name


def main(argv):
  del argv
  if _LABELS.value and len(_LABELS.value) != len(_RUNS.value):
    raise app.UsageError(f"--labels: {len(_LABELS.value)} label(s) for {len(_RUNS.value)} runs; "
                         "give one per run.")
  runs = {}
  for i, d in enumerate(_RUNS.value):
    try:
      paths_lib.check_reachable(d, flag="--runs")
    except paths_lib.PathError as err:
      raise app.UsageError(str(err)) from None
    path = paths_lib.resolve(d) / "metrics.jsonl"
    if not path.exists():
      raise app.UsageError(f"--runs: {path} does not exist.")
    rows = read_jsonl(path)
    label = _LABELS.value[i] if _LABELS.value else run_label(d, rows)
    if label in runs:
      label = f"{label} ({paths_lib.resolve(d).name})"
    runs[label] = rows
  for p in plot_runs(runs, _OUT.value, _SMOOTH.value):
    print(p)


if __name__ == "__main__":
  cli.run(main)
