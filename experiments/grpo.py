"""GRPO with any KL term.

  python -m experiments.grpo --config configs/grpo_tiny.py --workdir DIR [--config.kl.term=...]

Writes DIR/metrics.jsonl (one object a step), DIR/tensorboard, DIR/checkpoints; rerunning the same
command resumes from the newest checkpoint that verifies. A run holds DIR's lock until it exits.
DIR (and every path of the config) may be a local directory or a URL such as gs://BUCKET/RUN.
Errors that need no traceback (a bad flag or path, a held DIR, a checkpoint that cannot be saved or
restored, a non-finite step) print one line and exit with status 1.

With several processes (--distributed), process 0 prepares the dataset and the warm start while
the others wait, then every process reads them.
"""

from __future__ import annotations

import contextlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kljax import paths
from kljax.train import grpo, multihost, runlock
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
  workdir = paths.resolve(_WORKDIR.value)
  leader = jax.process_index() == 0
  try:
    grpo.validate(config, workdir)
    with multihost.leader_first("to prepare the dataset"):
      grpo.check_prompt_lengths(config)  # reads the dataset (preparing it on first use)
  except (grpo.ConfigError, multihost.LeaderFailedError) as err:
    raise app.UsageError(str(err)) from None
  try:
    with contextlib.ExitStack() as stack:
      with multihost.leader_first("to take the run lock"):
        if leader:
          stack.enter_context(runlock.hold(workdir))
      with multihost.leader_first("to make the warm start"):
        init_model = initial_model(config, workdir / "sft")
      history = grpo.train(config, workdir, init_model=init_model)
  except (runlock.RunLockedError, CheckpointError, grpo.NonFiniteError, grpo.ConfigError,
          multihost.LeaderFailedError) as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
  if history:
    first, last = history[0], history[-1]
    print(f"steps {first['step']}..{last['step']}: reward {first['reward_mean']:.3f} -> "
          f"{last['reward_mean']:.3f}, exact KL(π‖π_ref) {last['exact_rkl']:.4f}; "
          f"metrics in {workdir / 'metrics.jsonl'}")


if __name__ == "__main__":
  app.run(main)
