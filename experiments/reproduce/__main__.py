"""Reproduce Liu et al. (arXiv:2510.01555): the oracle table, the bandit and GRPO runs.

  python -m experiments.reproduce --quick --workdir runs/reproduce   # the README's main job
  python -m experiments.reproduce --workdir runs/reproduce_full      # the full comparison
  python -m experiments.reproduce --quick --workdir DIR --config.seeds=3   # any setting, dotted

The settings are configs/reproduce.py (`--quick` is short for `--config=configs/reproduce.py:quick`;
without it, the full preset). Writes DIR/report.md (tables, a verdict per claim of the paper),
DIR/results.json, and PNG figures; DIR may be local or a URL (gs://BUCKET/…). Each GRPO run lives in
DIR/grpo/<block>/<variant>/seed<k> with its own checkpoints and stored wall time: rerunning the
same command after a crash or kill resumes where it stopped and skips finished runs, and the
report's total time stays the cost of the runs it reports.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from kljax import cli

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "reproduce.py")


def quick_argv(argv: list[str]) -> list[str]:
  """`--quick` selects the quick preset: `--config=…:quick` goes first, so that dotted overrides
  given anywhere apply to it (an explicit --config still wins)."""
  if "--quick" in argv[1:] and not any(a.startswith("--config=") or a == "--config"
                                        for a in argv[1:]):
    return [argv[0], f"--config={_CONFIG_FILE}:quick", *argv[1:]]
  return argv


if __name__ == "__main__":
  sys.argv[:] = quick_argv(sys.argv)  # before the config flag is defined: it reads sys.argv
_CONFIG = cli.define_config_file(
    "config", f"{_CONFIG_FILE}:full", "The reproduction's settings (configs/reproduce.py:quick|full).",
    docs=_CONFIG_FILE)
_QUICK = flags.DEFINE_bool("quick", False,
                           "Short for --config=configs/reproduce.py:quick (the README main job).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (report, figures, runs).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", "~/.cache/kljax/jax_cache",
    "JAX's persistent compilation cache ('' disables it). The GRPO runs of one setting compile the "
    "same programs: with the cache each is compiled once, not once per run.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from experiments.reproduce import running, settings as settings_lib
  from kljax import paths

  settings = _CONFIG.value
  try:
    settings_lib.validate(settings)
  except ValueError as err:
    raise app.UsageError(f"--config.{err}") from None
  if _COMPILE_CACHE.value:
    enable_compile_cache(os.path.expanduser(_COMPILE_CACHE.value))
  start = time.time()
  results = running.run(settings, _WORKDIR.value, progress=_PROGRESS.value)
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
