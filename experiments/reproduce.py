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
import os
import time

from absl import app, flags, logging

from kljax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (report, figures, runs).")
_QUICK = flags.DEFINE_bool("quick", False, "The small version (the README main job).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per GRPO variant (default: 2 quick, 4 full).")
_STEPS = flags.DEFINE_integer("steps", None, "GRPO steps per run (default: 150 quick, 400 full).")
_BETA = flags.DEFINE_float("beta", 0.5, "KL coefficient β of every GRPO run (the paper's 0.5).")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/.cache/kljax/tfds", "TFDS data directory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", "~/.cache/kljax/jax_cache",
    "JAX's persistent compilation cache ('' disables it). The GRPO runs of one setting compile the "
    "same programs: with the cache each is compiled once, not once per run.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from kljax import reproduce

  if _COMPILE_CACHE.value:
    enable_compile_cache(os.path.expanduser(_COMPILE_CACHE.value))

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


def enable_compile_cache(path: str) -> None:
  """Every compiled program is cached under `path`, however short its compilation."""
  import jax

  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


if __name__ == "__main__":
  cli.run(main)
