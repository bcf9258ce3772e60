"""Reproduce Liu et al. (arXiv:2510.01555) end to end: the oracle table, the bandit and GRPO runs.

  python -m experiments.reproduce --workdir runs/reproduce --quick   # ≤ 10 min on 2 CPU cores
  python -m experiments.reproduce --workdir runs/reproduce_full      # the full comparison

Writes DIR/report.md (tables, a verdict per claim of the paper), DIR/results.json, and PNG figures;
DIR may be local or a URL (gs://BUCKET/…).
Each GRPO run lives in DIR/grpo/<variant>/seed<k> with its own checkpoints: rerunning the same
command after a crash or kill resumes where it stopped and skips finished runs.
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (report, figures, runs).")
_QUICK = flags.DEFINE_bool("quick", False, "The small version (the README main job).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per GRPO variant (default: 2 quick, 4 full).")
_STEPS = flags.DEFINE_integer("steps", None, "GRPO steps per run (default: 150 quick, 400 full).")
_BETA = flags.DEFINE_float("beta", 0.5, "KL coefficient β of every GRPO run (the paper's 0.5).")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/.cache/kljax/tfds", "TFDS data directory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from kljax import reproduce

  settings = reproduce.Settings.quick() if _QUICK.value else reproduce.Settings.full()
  overrides = {"seeds": _SEEDS.value, "steps": _STEPS.value}
  try:
    if _SEEDS.value is not None or _STEPS.value is not None:
      settings = settings.replace(label=settings.label + " (modified)")
    settings = settings.replace(beta=_BETA.value, data_dir=_DATA_DIR.value,
                                **{k: v for k, v in overrides.items() if v is not None})
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  start = time.time()
  from kljax import paths

  results = reproduce.run(settings, _WORKDIR.value, progress=_PROGRESS.value)
  print(f"done in {time.time() - start:.0f} s: {paths.resolve(_WORKDIR.value) / 'report.md'}")
  print(json.dumps(results["verdicts"], indent=1, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)
