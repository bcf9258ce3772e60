"""GRPO with any KL term.

  python -m experiments.grpo --config configs/grpo_tiny.py --workdir DIR [--config.kl.term=...]

Writes DIR/metrics.jsonl (one object a step), DIR/tensorboard, DIR/checkpoints; rerunning the same
command resumes from the newest checkpoint that verifies. A run holds DIR's lock until it exits.
Errors that need no traceback (a bad flag or path, a held DIR, a checkpoint that cannot be saved or
restored, a non-finite step) print one line and exit with status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kljax.train import grpo, runlock
from kljax.train.checkpoint import CheckpointError
from kljax.train.sft import initial_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grpo_tiny.py", "GRPO config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host / multi-process).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0; omit on TPU pods and SLURM (auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes only
    explicit = {}
    if _COORDINATOR.value:
      explicit = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                      process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**explicit)
  config = _CONFIG.value
  config.data.data_dir = os.path.expanduser(config.data.data_dir)
  try:
    grpo.validate(config, _WORKDIR.value)
    grpo.check_prompt_lengths(config)  # reads the dataset (preparing it on first use)
  except grpo.ConfigError as err:
    raise app.UsageError(str(err)) from None
  try:
    with runlock.hold(_WORKDIR.value) if jax.process_index() == 0 else contextlib.nullcontext():
      init_model = initial_model(config, os.path.join(_WORKDIR.value, "sft"))
      history = grpo.train(config, _WORKDIR.value, init_model=init_model)
  except (runlock.RunLockedError, CheckpointError, grpo.NonFiniteError) as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
  if history:
    first, last = history[0], history[-1]
    print(f"steps {first['step']}..{last['step']}: reward {first['reward_mean']:.3f} -> "
          f"{last['reward_mean']:.3f}, exact KL(π‖π_ref) {last['exact_rkl']:.4f}; "
          f"metrics in {os.path.join(_WORKDIR.value, 'metrics.jsonl')}")


if __name__ == "__main__":
  app.run(main)
